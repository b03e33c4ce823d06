"""The runtime-settings tables of docs/settings.md, made from the settings classes at build time.

An mkdocs hook (mkdocs.yml `hooks:`): `<!-- settings-tables -->` in a page becomes one table per
class of `cvops.settings.SETTINGS_CLASSES`, one row per environment variable the class adds
(`cvops.settings.settings_rows`: variable, default, `Field(description=...)`), with the bounds and
allowed values pydantic checks, so the page cannot drift from the code. Run it as a script to
print the tables.
"""
from __future__ import annotations

import typing

MARKER = "<!-- settings-tables -->"
BOUNDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "length ≥", "max_length": "length ≤"}


def allowed(field) -> str:
    "Bounds from the field's metadata (`gt=0` -> `> 0`), and the values of a Literal."
    parts = [f"{sign} {getattr(m, key)}" for m in field.metadata for key, sign in BOUNDS.items()
             if getattr(m, key, None) is not None]
    if typing.get_origin(field.annotation) is typing.Literal:
        parts.append(" / ".join(f"`{a}`" for a in typing.get_args(field.annotation)))
    return ", ".join(parts)


def shown(value) -> str:
    if value == "(derived)":
        return value
    return "(none)" if value is None else f"`{value}`"


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def settings_table(cls) -> str:
    "A markdown table of the variables `cls` adds to its parent classes."
    from cvops.settings import env_name, settings_rows
    field_of = {env_name(cls, name): field for name, field in cls.model_fields.items()}
    rows = ["| variable | default | allowed | what it sets |", "|---|---|---|---|"]
    for row in settings_rows(cls):
        rows.append(f"| `{row['variable']}` | {cell(shown(row['default']))} | {cell(allowed(field_of[row['variable']]))} "
                    f"| {cell(row['description'])} |")
    return "\n".join(rows)


def settings_tables() -> str:
    "One section per settings class: its name and docstring, then its table."
    from cvops.settings import SETTINGS_CLASSES
    parts = []
    for cls in SETTINGS_CLASSES:
        doc = (cls.__doc__ or "").strip()
        parent = next((b.__name__ for b in cls.__mro__[1:] if b in SETTINGS_CLASSES), None)
        also = f" It also reads every variable of `{parent}`." if parent else ""
        parts.append(f"### `{cls.__name__}`\n\n`{cls.__module__}.{cls.__name__}`: {doc}{also}\n\n{settings_table(cls)}\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return markdown.replace(MARKER, settings_tables()) if MARKER in markdown else markdown


if __name__ == "__main__":
    print(settings_tables())
