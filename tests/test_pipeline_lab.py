"""`make lab` as a user lives it: the pipeline's task notebooks get the current config's
parameters and the paths of their upstream products (`make nb-inject`: `ploomber nb --inject`),
a task notebook then runs cell by cell against a tiny built pipeline (here with nbclient, as
JupyterLab's kernel would), and `make nb-clean` leaves exactly the committed text."""
import json
import shutil
import subprocess

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import BIN, REPO, base_config
from test_repo import injected_cells

pytestmark = pytest.mark.e2e


def make(project, target: str) -> subprocess.CompletedProcess:
    "Run a target of this repository's Makefile in the project folder, with this venv."
    venv = BIN.parent
    proc = subprocess.run(["make", "--no-print-directory", "-f", str(REPO / "Makefile"), f"VENV={venv}",
                           "-o", str(venv / ".cvops-installed"), target],  # the venv is there: do not rebuild it
                          cwd=project.path, env=project.env, text=True, capture_output=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"make {target} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def tagged(nb, tag: str) -> list[int]:
    return [i for i, c in enumerate(nb.cells) if tag in c.metadata.get("tags", [])]


def test_lab_injects_the_config_runs_a_task_notebook_and_removes(project, tiny_fashion_repo):
    shutil.copy(REPO / "pyproject.toml", project.path)  # nbdev-clean's settings (which metadata to keep)
    project.write_config(base_config(dataset={"path": str(tiny_fashion_repo)}))
    project.run("ploomber", "task", "prepare_data")  # the upstream product validate_data reads
    notebooks = sorted((project.path / "notebooks" / "pipeline").glob("*.ipynb"))
    committed = {p.name: p.read_text() for p in notebooks}

    make(project, "nb-inject")
    assert all(injected_cells(p) for p in notebooks), {p.name: injected_cells(p) for p in notebooks}
    path = project.path / "notebooks" / "pipeline" / "validate_data.ipynb"
    nb = nbformat.read(path, as_version=4)
    (cell,) = tagged(nb, "injected-parameters")
    assert tagged(nb, "parameters") == [cell - 1]  # right after the defaults, so it overrides them
    injected = nb.cells[cell].source
    products = project.products("test_model")
    assert f'"dataset": "{products}/prepare_data/dataset.json"' in injected, injected  # upstream's real product
    assert f'"summary": "{products}/validate_data/summary.json"' in injected, injected
    assert 'validate = {"n_samples": 100, "blocking_checks": ["Label Drift"]}' in injected, injected

    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(project.path)}}).execute()
    checks = json.loads((products / "validate_data" / "summary.json").read_text())
    assert "Label Drift" in json.dumps(checks) and len(checks) > 3, checks
    assert (products / "validate_data" / "deepchecks_report.html").stat().st_size > 100_000
    shown = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "execute_result"]
    assert any("Label Drift" in str(o["data"]) for o in shown), shown  # the checks table, as the user sees it
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))

    make(project, "nb-clean")
    assert {p.name: p.read_text() for p in notebooks} == committed
    assert not any(injected_cells(p) for p in notebooks)
