"""The runtime-settings tables of docs/settings.md, made from the settings classes at build time.

An mkdocs hook (mkdocs.yml `hooks:`): `<!-- settings-tables -->` in a page becomes one table per
class below, one row per environment variable, from the pydantic fields (alias, default,
constraints, `Field(description=...)`), so the page cannot drift from the code. A variable shown
for an earlier class (a shared base class) is not repeated. Run it as a script to print the tables.
"""
from __future__ import annotations

import importlib
import typing

# The settings classes, in page order, by dotted name: change the names here when a class moves.
SETTINGS_CLASSES = [
    "cvops.serving.app.ServiceSettings",
    "cvops.monitoring.check_drift.MonitorSettings",
]
MARKER = "<!-- settings-tables -->"
CONSTRAINTS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "length ≥", "max_length": "length ≤"}


def load_class(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def env_variable(name: str, field) -> str:
    "The environment variable of a field: its validation alias (the first choice), else its name in capitals."
    alias = field.validation_alias
    choices = getattr(alias, "choices", None)
    if choices:
        return str(choices[0])
    return alias if isinstance(alias, str) else name.upper()


def shown_default(field) -> str:
    if field.default_factory is not None:
        return "(derived)"
    return "(none)" if field.default is None else f"`{field.default}`"


def constraints(field) -> str:
    "Bounds from the field's metadata (`gt=0` -> `> 0`), and the allowed values of a Literal."
    parts = [f"{sign} {getattr(m, key)}" for m in field.metadata for key, sign in CONSTRAINTS.items()
             if getattr(m, key, None) is not None]
    if typing.get_origin(field.annotation) is typing.Literal:
        parts.append(" / ".join(f"`{a}`" for a in typing.get_args(field.annotation)))
    return ", ".join(parts)


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def settings_table(cls, seen: set[str]) -> str:
    "A markdown table of `cls`'s variables not in `seen` (which it extends)."
    rows = ["| variable | default | allowed | what it sets |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        variable = env_variable(name, field)
        if variable in seen:
            continue
        seen.add(variable)
        rows.append(f"| `{variable}` | {cell(shown_default(field))} | {cell(constraints(field))} | {cell(field.description or '')} |")
    return "\n".join(rows)


def settings_tables(names=SETTINGS_CLASSES) -> str:
    "One section per class: its docstring, then its table."
    seen, parts = set(), []
    for dotted in names:
        cls = load_class(dotted)
        doc = (cls.__doc__ or "").strip()
        parts.append(f"### `{cls.__name__}`\n\n`{dotted}`{': ' + doc if doc else ''}\n\n{settings_table(cls, seen)}\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return markdown.replace(MARKER, settings_tables()) if MARKER in markdown else markdown


if __name__ == "__main__":
    print(settings_tables())
