"""The generated tables of the docs: the config keys and the stage map (an mkdocs hook).

- `<!-- config-tables -->` becomes one table per section of `configs/config.yaml`, walked from the
  pydantic models of `cvops.config.Config` (key, type, default, allowed values, description).
- `<!-- stage-map -->` becomes the stage map: each task of pipeline.yaml and pipeline.monitor.yaml,
  its task notebook, the library modules it imports (with their notebooks) and the test files that
  name the task or import one of its modules.
Both are read from the code at build time, so they follow every rename. Run as a script to print them.
"""
from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

REPO = Path(__file__).resolve().parents[1]
PIPELINES = ["pipeline.yaml", "pipeline.monitor.yaml"]
CONFIG_MARKER, STAGE_MARKER = "<!-- config-tables -->", "<!-- stage-map -->"
BOUNDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "length ≥"}
IMPORT = re.compile(r"^\s*(?:from\s+(cvops(?:\.\w+)+)\s+import|import\s+(cvops(?:\.\w+)+))", re.M)


# --- the config keys -------------------------------------------------------------------------

def type_name(annotation) -> str:
    "A short, readable type: `int`, `list[str]`, `int or null`, `'avg' / 'max'`."
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def default_of(field) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(below)"
    return "`null`" if value is None else f"`{json.dumps(value) if isinstance(value, (list, tuple)) else value}`"


def bounds_of(field) -> str:
    return ", ".join(f"{sign} {getattr(m, key)}" for m in field.metadata for key, sign in BOUNDS.items()
                     if getattr(m, key, None) is not None)


def nested_model(annotation):
    "The section model inside an annotation (`Architecture`, `Optional[InputSize]`), else None."
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def config_rows(model, prefix: str = "") -> list[str]:
    "Table rows for every key of `model`, nested sections flattened to dotted keys."
    rows = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        sub = nested_model(field.annotation)
        desc = (field.description or (sub.__doc__ if sub and sub.__doc__ else "") or "").strip()
        kind = "section" if sub else type_name(field.annotation)
        rows.append(f"| `{key}` | {kind} | {default_of(field)} | {bounds_of(field)} | {desc.replace('|', '/')} |")
        if sub:
            rows += config_rows(sub, key + ".")
    return rows


def config_tables() -> str:
    from cvops.config import Config
    parts = []
    for name, field in Config.model_fields.items():
        section, key = nested_model(field.annotation), field.alias or name
        doc = f"{section.__doc__.strip()}\n\n" if section.__doc__ and "Base of every" not in section.__doc__ else ""
        parts.append(f"### `{key}`\n\n{doc}| key | type | default | allowed | description |\n|---|---|---|---|---|\n"
                     + "\n".join(config_rows(section, key + ".")) + "\n")
    return "\n".join(parts)


# --- the stage map ---------------------------------------------------------------------------

def pipeline_tasks() -> list[tuple[str, str, str]]:
    "(pipeline file, task name, task notebook) for every task, in pipeline order."
    found = []
    for pipeline in PIPELINES:
        for task in yaml.safe_load((REPO / pipeline).read_text())["tasks"]:
            found.append((pipeline, task["name"], task["source"]))
    return found


def imported_modules(text: str) -> list[str]:
    "The cvops modules `text` imports, in first-seen order (a package import counts as the package)."
    seen = []
    for m in IMPORT.finditer(text):
        mod = m.group(1) or m.group(2)
        if mod not in seen:
            seen.append(mod)
    return seen


def notebook_code(path: Path) -> str:
    return "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")


def module_notebook(module: str) -> str | None:
    "The library notebook a module is exported from (nbdev's 'File to edit' line)."
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.exists():
        return None
    m = re.search(r"File to edit: (\S+?\.ipynb)", path.read_text())
    return (path.parent / m.group(1)).resolve().relative_to(REPO).as_posix() if m else None


def tests_for(task: str, primary: str | None) -> list[str]:
    "Test files named after the task or its primary module, or importing that module."
    names = {task, primary.rpartition(".")[2]} if primary else {task}
    found = []
    for test in sorted((REPO / "tests").glob("test_*.py")):
        if any(n in test.stem for n in names) or (primary and primary in imported_modules(test.read_text())):
            found.append(test.relative_to(REPO).as_posix())
    return found


def own_modules(task: str, modules: list[str], shared: list[str]) -> list[str]:
    """The task's modules, the one named after the task first; plumbing modules only when the task
    has no other (its code then lives in the plumbing), never the config."""
    own = [m for m in modules if m not in shared] or [m for m in modules if m != "cvops.config"]
    return sorted(own, key=lambda m: m.rpartition(".")[2] != task)


def shared_modules(task_modules: dict[str, list[str]]) -> list[str]:
    "Modules imported by more than half of the task notebooks: plumbing, listed once below the map."
    counts = {}
    for mods in task_modules.values():
        for m in mods:
            counts[m] = counts.get(m, 0) + 1
    return sorted(m for m, n in counts.items() if n > len(task_modules) / 2)


def code(text: str) -> str:
    return f"`{text}`"


def stage_map(link_notebook=lambda path: code(path.removeprefix("notebooks/lib/"))) -> str:
    "The stage map as markdown; `link_notebook` renders a library notebook's path (a link when it has a page)."
    tasks = pipeline_tasks()
    task_modules = {name: imported_modules(notebook_code(REPO / source)) for _, name, source in tasks}
    shared = shared_modules(task_modules)
    rows = ["| task | task notebook | library modules | library notebooks | tests |", "|---|---|---|---|---|"]
    for pipeline, name, source in tasks:
        own = own_modules(name, task_modules[name], shared)
        notebooks = [nb for nb in map(module_notebook, own) if nb]
        tests = [t.removeprefix("tests/") for t in tests_for(name, own[0] if own else None)]
        where = "" if pipeline == PIPELINES[0] else f"<br>({pipeline})"
        rows.append(f"| **{name}**{where} | {code(source.removeprefix('notebooks/'))} | {'<br>'.join(map(code, own))} | "
                    f"{'<br>'.join(map(link_notebook, notebooks))} | {'<br>'.join(map(code, tests))} |")
    plumbing = ", ".join(f"{code(m)} ({link_notebook(module_notebook(m))})" for m in shared if module_notebook(m))
    return ("\n".join(rows) + f"\n\nTask notebooks are under `notebooks/`, library notebooks under `notebooks/lib/`, tests "
            f"under `tests/`; tasks are in `{PIPELINES[0]}` unless marked. Used by most tasks, so not repeated above: {plumbing}.\n")


# --- the hook --------------------------------------------------------------------------------

def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    def link_notebook(path: str) -> str:
        "A link to the notebook's executed page when the site has one (paths relative to the page)."
        rel = path.removeprefix("notebooks/lib/")
        built = next((f for f in files if f.src_uri.endswith("/" + rel) and f.abs_src_path
                      and not f.abs_src_path.startswith(config["docs_dir"])), None)
        if built is None:
            return code(rel)
        return f"[`{rel}`]({'../' * page.file.src_uri.count('/')}{built.src_uri})"
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, config_tables())
    if STAGE_MARKER in markdown:
        markdown = markdown.replace(STAGE_MARKER, stage_map(link_notebook))
    return markdown


if __name__ == "__main__":
    print(config_tables())
    print(stage_map())
