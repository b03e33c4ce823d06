"""Execute the library notebooks (notebooks/lib/**) once into a build folder, for the docs.

    .venv/bin/python docs/execute_notebooks.py [--out _build/docs/lib] [--only GLOB ...] [--jobs N]

Each notebook runs with nbclient in this venv's kernel, in its own folder (as nbval runs it in
`make test`), and its executed copy (outputs kept) goes to OUT/<path under notebooks/lib>. nbdev's
`#|` directive lines are dropped from the copy and `#| hide` cells left out, so the page reads as
prose, code and results. A copy is reused while the notebook and the library modules it imports
(directly or through other modules) are unchanged. A failing cell fails the build, naming the notebook: the docs never show a broken check.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "notebooks" / "lib"
DEFAULT_OUT = REPO / "_build" / "docs" / "lib"
STAMP_KEY = "cvops_docs_source_hash"
# TensorFlow's C++ start-up lines reach a cell's stderr even with TF_CPP_MIN_LOG_LEVEL=3 (absl logs
# before it reads the level): "WARNING: All log messages before absl::InitializeLog() ..." and
# "E0000 00:00:1795... cuda_dnn.cc:8310] Unable to register cuDNN factory ...".
TF_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|[EWIF]\d{4} [\d:.]+\s+\d+ \S+\.cc:\d+\])")
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3", "PLOOMBER_STATS_ENABLED": "false",
         "DISABLE_DEEPCHECKS_ANONYMOUS_TELEMETRY": "True", "DVC_NO_ANALYTICS": "1", "PYTHONWARNINGS": "ignore"}


def library_notebooks(only: list[str] | None = None) -> list[Path]:
    "The library notebooks, in path order; with `only`, those whose path under notebooks/lib matches a glob."
    found = sorted(p for p in LIB.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    if only:
        found = [p for p in found if any(p.relative_to(LIB).match(g) for g in only)]
    return found


def module_file(name: str, package_dir: Path) -> Path | None:
    "The file of module `name` (`cvops.a.b`) under `package_dir` (the `cvops` folder), or None when it is not a module there."
    parts = name.split(".")[1:]
    for f in (package_dir.joinpath(*parts).with_suffix(".py") if parts else None, package_dir.joinpath(*parts, "__init__.py")):
        if f is not None and f.exists():
            return f
    return None


def imported_modules(code: str, package: str, current: str = "") -> set[str]:
    """The `package` modules `code` imports, at any depth (imports inside functions too, relative ones resolved against
    the module `current`); `from pkg.a import b` names `pkg.a` and `pkg.a.b` (the latter counts only where it is a module)."""
    import ast
    found = set()
    for chunk in [code] if current else re.split(r"(?m)^# ---- cell ----$", code):
        try:
            tree = ast.parse("\n".join(l for l in chunk.splitlines() if not l.lstrip().startswith(("%", "!"))))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = current.split(".")[: len(current.split(".")) - node.level]
                    base = ".".join(up + ([base] if base else []))
                found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m == package or m.startswith(package + ".")}


def notebook_modules(nb: Path, package_dir: Path) -> list[Path]:
    """The library files notebook `nb` depends on: its own module (`#| default_exp`), the `package_dir` modules its
    cells import and, transitively, what those import; the package's `__init__.py` always."""
    import nbformat
    package = package_dir.name
    cells = [c.source for c in nbformat.read(nb, as_version=4).cells if c.cell_type == "code"]
    todo = imported_modules("\n# ---- cell ----\n".join(cells), package) | {package}
    todo |= {f"{package}.{m}" for c in cells for m in re.findall(r"^#\|\s*default_exp\s+(\S+)", c, re.M)}
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        f = module_file(name, package_dir)
        if f is None or name in seen:
            continue
        seen[name] = f
        current = f"{name}.__init__" if f.name == "__init__.py" else name   # what relative imports are resolved against
        todo |= imported_modules(f.read_text(), package, current) - set(seen)
    return sorted(set(seen.values()))


def source_hash(nb: Path, package_dir: Path = REPO / "cvops") -> str:
    "Hash of the notebook and of the library modules it depends on (`notebook_modules`): a change to any re-executes it."
    h = hashlib.sha256(nb.read_bytes())
    for mod in notebook_modules(nb, package_dir):
        h.update(mod.relative_to(package_dir.parent).as_posix().encode() + mod.read_bytes())
    return h.hexdigest()


def is_current(out: Path, digest: str) -> bool:
    import nbformat
    if not out.exists():
        return False
    return nbformat.read(out, as_version=4).metadata.get(STAMP_KEY) == digest


def without_tf_noise(outputs: list) -> list:
    "The cell's outputs with TensorFlow's C++ log lines taken out of its stderr (an output left empty goes)."
    kept = []
    for out in outputs:
        if out.get("output_type") == "stream" and out.get("name") == "stderr":
            out["text"] = "".join(line for line in out["text"].splitlines(keepends=True) if not TF_NOISE.match(line))
            if not out["text"].strip():
                continue
        kept.append(out)
    return kept


def for_reading(nb):
    "The executed notebook as a page: nbdev directives (`#| export`, ...) and TensorFlow's log lines dropped, `#| hide` cells left out."
    page = copy.deepcopy(nb)
    cells = []
    for cell in page.cells:
        lines = cell.source.splitlines()
        if cell.cell_type == "code":
            if any(line.strip().startswith("#| hide") for line in lines):
                continue
            cell.source = "\n".join(line for line in lines if not line.startswith("#|")).strip("\n")
            cell.outputs = without_tf_noise(cell.get("outputs", []))
            if not cell.source and not cell.get("outputs"):
                continue
        cells.append(cell)
    page.cells = cells
    return page


def execute(nb_path: Path, out: Path, timeout: int = 900) -> float:
    "Run `nb_path` in its own folder and write its page to `out`; seconds taken."
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    os.environ.update(QUIET)
    started = time.monotonic()
    nb = nbformat.read(nb_path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(nb_path.parent)}})
    try:  # the kernel's own stderr (TensorFlow's C++ start-up lines) stays off the terminal; cell output is kept
        client.execute(stderr=subprocess.DEVNULL)
    except CellExecutionError as e:
        raise RuntimeError(f"{nb_path.relative_to(REPO)}: a cell failed\n{e}") from None
    page = for_reading(nb)
    page.metadata[STAMP_KEY] = source_hash(nb_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    nbformat.write(page, tmp)
    tmp.replace(out)
    return time.monotonic() - started


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the executed copies")
    ap.add_argument("--only", nargs="+", metavar="GLOB", help="only these notebooks (globs under notebooks/lib)")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("DOCS_JOBS", "1")), help="notebooks run at once")
    ap.add_argument("--force", action="store_true", help="execute even when an executed copy is current")
    args = ap.parse_args(argv)
    todo, out_of = [], {}
    for nb in library_notebooks(args.only):
        out_of[nb] = args.out / nb.relative_to(LIB)
        if args.force or not is_current(out_of[nb], source_hash(nb)):
            todo.append(nb)
    print(f"docs: {len(out_of)} library notebooks, {len(todo)} to execute", flush=True)
    failures = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = {nb: pool.submit(execute, nb, out_of[nb]) for nb in todo}
        for nb, run in runs.items():
            try:
                print(f"  {nb.relative_to(LIB)}: {run.result():.0f} s", flush=True)
            except Exception as e:  # report every failing notebook, then fail
                failures += 1
                print(f"  {nb.relative_to(LIB)}: FAILED\n{e}", file=sys.stderr, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
