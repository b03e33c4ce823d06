"""`make docs` builds the site: the library notebooks executed, with their outputs, and the pages
of docs/ with their generated tables. Builds a few notebooks only (the same scripts `make docs`
runs, with `--only`), into a temporary folder, to stay quick."""
import html
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Library notebooks that execute quickly and print or draw something (most library notebooks are
# checks that print nothing); globs under notebooks/lib, loose enough to survive a renumbering.
SUBSET = ["data/*_dataset.ipynb", "monitoring/*_drift_detectors.ipynb", "monitoring/*_check_drift.ipynb"]
TASKS = ["prepare_data", "validate_data", "train", "drift_detectors", "evaluate", "publish", "deploy", "check_drift"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "The site built from docs/ and SUBSET, as `make docs` builds it: (executed notebooks folder, site folder)."
    tmp = tmp_path_factory.mktemp("docs")
    notebooks, site = tmp / "lib", tmp / "site"
    env = {**os.environ, "CVOPS_DOCS_NOTEBOOKS": str(notebooks), "TF_CPP_MIN_LOG_LEVEL": "3", "NO_MKDOCS_2_WARNING": "1"}
    for cmd in ([str(BIN / "python"), "docs/execute_notebooks.py", "--out", str(notebooks), "--only", *SUBSET],
                [str(BIN / "mkdocs"), "build", "--quiet", "--site-dir", str(site)]):
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, f"{cmd[1]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return notebooks, site


def page_text(path: Path) -> str:
    return html.unescape(path.read_text())


def outputs(nb: dict) -> list[str]:
    "What the executed notebook's cells show: stream lines, plain-text results (when nothing richer) and PNG data."
    found = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "image/png" in data:
                found.append("".join(data["image/png"])[:200].strip())
            text = out.get("text") or (data.get("text/plain") if set(data) == {"text/plain"} else "") or ""
            found += [line.strip() for line in "".join(text).splitlines() if len(line.strip()) > 8 and "\x1b" not in line]
    return found


def test_library_notebooks_appear_executed_with_their_outputs(site):
    notebooks, site_dir = site
    executed = sorted(notebooks.rglob("*.ipynb"))
    assert len(executed) >= 3, f"SUBSET matched {executed}: update its globs to notebooks that still exist"
    shown = []
    for copy in executed:
        rel = copy.relative_to(notebooks)
        source = json.loads((REPO / "notebooks" / "lib" / rel).read_text())
        assert not any(c.get("outputs") for c in source["cells"]), f"{rel}: the source has outputs; they would not prove execution"
        found = outputs(json.loads(copy.read_text()))
        page = page_text(site_dir / "lib" / rel.with_suffix(".html"))
        missing = [o for o in found if o not in page]
        assert not missing, f"{rel}: outputs missing from its page: {missing[:3]}"
        assert "#| export" not in page, f"{rel}: nbdev directives left in the page"
        if found:
            shown.append(rel)
    assert len(shown) >= 3, f"only {shown} show outputs; the docs must show the executed outputs of at least three notebooks"


def test_settings_page_is_generated_from_the_settings_classes(site):
    page = page_text(site[1] / "settings.html")
    for variable in ("LOG_DURABILITY", "MONITOR_WEBHOOK_URL", "DB_URL", "ADMIN_TOKEN", "MAX_QUEUE"):
        assert f"<code>{variable}</code>" in page, variable
    assert "<!-- settings-tables -->" not in page
    assert "rows are fsynced" in page, "the field descriptions are in the table"


def test_configuration_page_lists_every_config_key(site):
    from cvops.config import Config
    page = page_text(site[1] / "configuration.html")
    for section, field in Config.model_fields.items():
        key = field.alias or section
        for name, sub in field.annotation.model_fields.items():
            assert f"<code>{key}.{sub.alias or name}</code>" in page, f"{key}.{name}"


def test_stage_map_names_every_task_and_links_its_notebooks(site):
    page = page_text(site[1] / "stage-map.html")
    for task in TASKS:
        assert f"<strong>{task}</strong>" in page, task
    assert 'href="lib/monitoring/' in page, "a built library notebook is linked from the stage map"


def test_index_and_pages_are_in_the_site(site):
    site_dir = site[1]
    for page in ("index", "pipeline", "configuration", "settings", "serving", "monitoring", "production", "stage-map"):
        assert (site_dir / f"{page}.html").exists(), page
    index = page_text(site_dir / "index.html")
    assert "Library notebooks" in index, "the executed notebooks are in the nav"


def test_an_executed_notebook_is_reused_until_a_module_it_depends_on_changes(tmp_path):
    """`make docs` re-executes a notebook when it or a library module it imports (directly, inside a function, or
    through another module's relative import) changes, and reuses its executed copy when an unrelated module changes."""
    import nbformat
    sys.path.insert(0, str(REPO / "docs"))
    try:
        from execute_notebooks import notebook_modules, source_hash
    finally:
        sys.path.remove(str(REPO / "docs"))
    pkg = tmp_path / "cvops"
    files = {"__init__.py": "", "low.py": "X = 1\n", "unrelated.py": "Y = 2\n", "sub/__init__.py": "",
             "sub/mid.py": "def f():\n    from ..low import X\n    return X\n", "sub/own.py": "Z = 3\n"}
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    nb = tmp_path / "01_own.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("#| default_exp sub.own"),
                                                   nbformat.v4.new_code_cell("%matplotlib inline\nfrom cvops.sub import mid\nmid.f()")]), nb)
    assert [p.relative_to(pkg).as_posix() for p in notebook_modules(nb, pkg)] == ["__init__.py", "low.py", "sub/__init__.py",
                                                                                    "sub/mid.py", "sub/own.py"]
    before = source_hash(nb, pkg)
    (pkg / "unrelated.py").write_text("Y = 3\n")
    assert source_hash(nb, pkg) == before                      # reused
    (pkg / "low.py").write_text("X = 2\n")
    assert source_hash(nb, pkg) != before                      # re-executed: mid imports low inside a function
