"""The pipeline under Airflow 3, end to end: `cvops export airflow` writes the DAGs of a tiny
project; in Airflow's own environment (`make airflow`: .venv-airflow) with a throwaway
AIRFLOW_HOME (SQLite), `DagBag` imports them without errors, their graphs are pipeline.yaml's and
pipeline.monitor.yaml's as Ploomber reads them, and `dag.test()` runs the training DAG (then the
monitor DAG) with central storage on an object store (a real SeaweedFS, `CVOPS_CENTRAL_STORAGE=s3://...` in the
environment the tasks run with): the version, with every task's rendered notebook, is published and deployed on the store
(read back through the registry API, nothing lands in the local central_storage/), the task notebooks are also kept under
products/, `cvops models` lists it from the store, and the monitor's drift check reads the deployed version from it."""
import json
import os
import shutil
import subprocess
import time
import warnings

import pytest
import yaml

from conftest import BIN, REPO, base_config
from cvops.registry.store import exists, open_store
from cvops.registry.versions import (METADATA_FILE, current_deployment, deployment_history, published_models, published_versions,
                                     read_file, storage_path)
from cvops.testing import need, repo_root, seaweedfs_or_need

pytestmark = pytest.mark.e2e
AIRFLOW_VENV = REPO / ".venv-airflow"

# Runs in Airflow's environment: argv = dags folder, then the DAG ids to run with dag.test(), in order.
IN_AIRFLOW = r'''
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dags = bag.dags.values()
out = {"import_errors": {k: str(v) for k, v in bag.import_errors.items()},
       "graphs": {d.dag_id: {t.task_id: sorted(t.upstream_task_ids) for t in d.tasks} for d in dags},
       "schedules": {d.dag_id: str(d.schedule) for d in dags}, "catchup": {d.dag_id: d.catchup for d in dags},
       "retries": {d.dag_id: sorted({t.retries for t in d.tasks}) for d in dags},
       "queues": {t.task_id: t.queue for d in dags for t in d.tasks}, "runs": {}}
for dag_id in sys.argv[2:]:
    if out["import_errors"]: break
    run = bag.dags[dag_id].test()
    state = lambda s: str(getattr(s, "value", s))
    out["runs"][dag_id] = {"state": state(run.state), "tasks": {ti.task_id: state(ti.state) for ti in run.get_task_instances()}}
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def airflow_bin():
    "Airflow's environment, made or brought up to date by `make airflow` (a stamp: nothing to do when it is there)."
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), f"VENV={BIN.parent}", "-o", str(BIN.parent / ".cvops-installed"),
                           "airflow"], capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not (AIRFLOW_VENV / "bin" / "airflow").exists():
        need("Airflow's own environment (.venv-airflow)", f"`make airflow` failed (it installs from PyPI):\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
    return AIRFLOW_VENV / "bin"


def ploomber_graph(spec, env: dict) -> dict:
    "Each task of a Ploomber spec with its upstream task names, read by Ploomber itself."
    from ploomber.spec import DAGSpec
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dag = DAGSpec(str(spec), env=env).to_dag()
    return {name: sorted(dag[name].upstream) for name in dag}


def in_airflow(airflow_bin, env, *args, timeout=1500) -> subprocess.CompletedProcess:
    "A command of Airflow's environment; `timeout` only guards against a hang (2 cores: the DAG runs take ~4 min)."
    proc = subprocess.run([str(airflow_bin / args[0]), *args[1:]], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{args[:2]} exited {proc.returncode}\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture
def weed(tmp_path, monkeypatch):
    "A real SeaweedFS; this process's environment reaches it too (the registry API reads the store back)."
    store = seaweedfs_or_need(tmp_path / "seaweedfs")
    store.start(timeout=300)   # a loaded machine
    try:
        for k, v in store.env().items(): monkeypatch.setenv(k, v)
        monkeypatch.setenv("CVOPS_VAR_DIR", str(tmp_path / "var"))
        yield store
    finally: store.stop()


def test_exported_dags_import_match_the_pipeline_and_run(project, tiny_fashion_repo, airflow_bin, weed, tmp_path):
    started = time.monotonic()
    central = f"s3://{weed.bucket}/central-airflow"   # the DAG tasks, `cvops models` and this test: all on the store
    project.env.update({**weed.env(), "CVOPS_CENTRAL_STORAGE": central, "CVOPS_VAR_DIR": os.environ["CVOPS_VAR_DIR"]})
    cfg = base_config(dataset={"path": str(tiny_fashion_repo)}, deploy={"max_regression": 1.0})
    project.write_config(cfg)
    shutil.copy(repo_root() / "pipeline.monitor.yaml", project.path / "pipeline.monitor.yaml")
    shutil.copytree(repo_root() / "notebooks" / "monitor", project.path / "notebooks" / "monitor")

    out = project.run("cvops", "export", "airflow", "--out", "dags", "--monitor-interval", "1d", "--queue", "train=gpu").stdout
    dags = project.path / "dags"
    assert f"wrote {dags / 'cvops_train.py'}\nwrote {dags / 'cvops_monitor.py'}\nwrote {dags / 'cvops_retrain.py'}\n" in out, out
    assert "schedule=None," in (dags / "cvops_train.py").read_text()

    home = tmp_path / "airflow-home"
    env = {**project.env, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(dags), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING", "CVOPS_BIN": str(BIN / "cvops")}  # the tasks run this venv's cvops
    in_airflow(airflow_bin, env, "airflow", "db", "migrate")
    exported = time.monotonic()
    proc = in_airflow(airflow_bin, env, "python", "-c", IN_AIRFLOW, str(dags), "cvops_train", "cvops_monitor")
    ran = time.monotonic()
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["import_errors"] == {}, result["import_errors"]

    # the graphs are the pipelines' own, as Ploomber reads them (upstream declared in the task notebooks)
    train_graph = ploomber_graph(project.path / "pipeline.yaml", cfg)
    assert train_graph["train"] == ["prepare_data", "validate_data"] and "publish" in train_graph["deploy"]
    monitor_graph = ploomber_graph(project.path / "pipeline.monitor.yaml", {"monitor": cfg["monitor"], "run_id": "x"})
    assert result["graphs"] == {"cvops_train": train_graph, "cvops_monitor": monitor_graph, "cvops_retrain": {"retrain": []}} == {
        "cvops_train": train_graph, "cvops_monitor": {"check_drift": []}, "cvops_retrain": {"retrain": []}}, result["graphs"]
    assert result["schedules"] == {"cvops_train": "None", "cvops_monitor": "1 day, 0:00:00", "cvops_retrain": "None"}, result["schedules"]
    assert result["catchup"] == {"cvops_train": False, "cvops_monitor": False, "cvops_retrain": False}
    assert result["retries"] == {"cvops_train": [1], "cvops_monitor": [1], "cvops_retrain": [0]}, result["retries"]   # a failed retraining fails its proposal
    assert {t: q for t, q in result["queues"].items() if q != "default"} == {"train": "gpu", "retrain": "gpu"}, result["queues"]   # dag.test() ignores queues

    # the training DAG ran every task, each through Ploomber in the project folder
    runs = result["runs"]
    assert runs["cvops_train"] == {"state": "success", "tasks": {t: "success" for t in train_graph}}, (runs, proc.stderr[-5000:])
    products = project.products("test_model")
    for task in train_graph:   # every task's rendered notebook, as `cvops build` keeps it
        nb = json.loads((products / task / f"{task}.ipynb").read_text())
        assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), task
        assert "<html" in (products / task / f"{task}.html").read_text()[:2000].lower(), task
    # publish published on the object store (read back through the registry API): the version, with the records of the tasks
    # that made it (publish's own added by its on_finish hook); deploy moved the store's deployment pointer to it
    assert published_models(central) == ["test_model"]
    (version,) = published_versions(central, "test_model")
    meta = yaml.safe_load(read_file(central, storage_path(version, METADATA_FILE)))
    assert meta["version"] == version == json.loads((products / "publish" / "metadata.json").read_text())["version"]
    assert exists(open_store(central), storage_path(version, "model.keras")) and meta["training"]["epochs_run"] == 1
    assert list(meta["lineage"]["notebooks"]) == [t for t in train_graph if t != "deploy"]
    for task, rec in meta["lineage"]["notebooks"].items():   # the rendered notebooks inside the published version, on the store
        assert read_file(central, rec["html"]) == (products / task / f"{task}.html").read_text(), task
        assert json.loads(read_file(central, rec["ipynb"])) == json.loads((products / task / f"{task}.ipynb").read_text()), task
    deployed = current_deployment(central)
    assert (deployed["model_name"], deployed["version"], deployed["previous_version"]) == ("test_model", version, None), deployed
    assert [r["version"] for r in deployment_history(central)] == [version]
    assert json.loads((products / "deploy" / "deployment.json").read_text())["version"] == version
    assert [p for p in (project.path / "central_storage").rglob("*") if p.is_file()] == []   # nothing in the local central storage
    models = project.run("cvops", "models").stdout
    assert models.splitlines() == ["test_model", f"  * {version}"], models   # published and deployed, listed from the store

    # the monitor DAG ran `cvops monitor` once: a drift check of the version deployed on the store, its record kept
    assert runs["cvops_monitor"] == {"state": "success", "tasks": {"check_drift": "success"}}, runs
    (record,) = (project.path / "products" / "monitor").iterdir()
    report = json.loads((record / "report.json").read_text())
    assert report["model_version"] == meta["version"] and (record / "check_drift.html").is_file(), report
    assert (tmp_path / "var" / "cache" / "versions" / version / "detectors").is_dir()   # its detectors: downloaded from the store
    print(f"export + airflow db migrate: {exported - started:.0f} s; DagBag + dag.test() of both DAGs: {ran - exported:.0f} s; "
          f"in all {time.monotonic() - started:.0f} s")
