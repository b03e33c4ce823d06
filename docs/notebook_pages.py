"""The library notebooks as pages of the site (an mkdocs hook).

`docs/execute_notebooks.py` writes the executed library notebooks to a build folder
(`_build/docs/lib`, or `$CVOPS_DOCS_NOTEBOOKS`); this hook adds each one to the site under the
folder's name, `lib/<path under notebooks/lib>` (mkdocs-jupyter renders it, without executing it
again), and to the nav under "Library notebooks", one section per room. The pages of
OPTIONAL_PAGES (written by other work, e.g. docs/lab.md) join the nav only when their file exists.
"""
from __future__ import annotations

import os
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[1]
# (nav title, page, the nav entry it goes after)
OPTIONAL_PAGES = [("Editing a task in JupyterLab", "lab.md", "Stage map")]


def notebooks_dir() -> Path:
    return Path(os.environ.get("CVOPS_DOCS_NOTEBOOKS") or REPO / "_build" / "docs" / "lib").resolve()


def executed_notebooks() -> list[Path]:
    root = notebooks_dir()
    return sorted(p.relative_to(root) for p in root.rglob("*.ipynb")) if root.exists() else []


def library_nav(notebooks: list[Path]) -> list:
    "Top-level notebooks first, then one section per room (data, training, ...), as in notebooks/lib."
    site = notebooks_dir().name
    top = [f"{site}/{p.as_posix()}" for p in notebooks if len(p.parts) == 1]
    rooms = {}
    for p in notebooks:
        if len(p.parts) > 1:
            rooms.setdefault(p.parts[0], []).append(f"{site}/{p.as_posix()}")
    return top + [{room: pages} for room, pages in rooms.items()]


def with_optional_pages(nav: list, docs_dir: Path) -> list:
    for title, page, after in OPTIONAL_PAGES:
        if (docs_dir / page).exists():
            at = next((i + 1 for i, entry in enumerate(nav) if isinstance(entry, dict) and after in entry), len(nav))
            nav.insert(at, {title: page})
    return nav


def on_config(config, **kwargs):
    nav = with_optional_pages(list(config["nav"] or []), Path(config["docs_dir"]))
    notebooks = executed_notebooks()
    if notebooks:
        nav.append({"Library notebooks": library_nav(notebooks)})
    config["nav"] = nav
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files, config, **kwargs):
    root = notebooks_dir()
    for rel in executed_notebooks():  # a real source folder: mkdocs-jupyter's page reads abs_src_path
        files.append(File(f"{root.name}/{rel.as_posix()}", src_dir=str(root.parent), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files
