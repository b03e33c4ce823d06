"""End to end: the real pipeline (papermill notebooks under Ploomber) on small configs, and
its products: rendered notebooks, the DeepChecks report, MLflow runs, central storage."""
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import base_config
from cvops.dataset import make_synthetic_dataset

pytestmark = pytest.mark.e2e
TASKS = ["prepare_data", "validate_data", "train", "evaluate", "publish"]


def _metadata(project, name):
    return yaml.safe_load((project.path / "central_storage" / "models" / f"{name}.yaml").read_text())


def _mlflow_run(project, run_id):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project.path / 'mlruns' / 'mlflow.db'}")
    return client, client.get_run(run_id)


def test_default_pipeline_on_a_tiny_dvc_dataset(project, tiny_fashion_repo):
    "Fashion-MNIST as a git + DVC repo, one epoch: every product, lineage, MLflow, incremental rebuilds."
    project.write_config(base_config(dataset={"path": str(tiny_fashion_repo)}))
    build = project.run("cvops", "build")
    assert project.ran_tasks(build.stdout) == {t: True for t in TASKS}, build.stdout

    products = project.path / "products"
    for task in TASKS:  # every task keeps its rendered notebook, also as HTML
        nb = json.loads((products / task / f"{task}.ipynb").read_text())
        assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), task
        assert "<html" in (products / task / f"{task}.html").read_text()[:2000].lower()
    assert (products / "validate_data" / "deepchecks_report.html").stat().st_size > 100_000
    assert (products / "evaluate" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"

    metrics = json.loads((products / "evaluate" / "metrics.json").read_text())
    assert metrics["n_images"] == 200 and metrics["accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert 0.5 < metrics["macro_roc_auc"] <= 1 and "T-shirt_top" in metrics["report"]

    meta = _metadata(project, "test_model")
    models = project.path / "central_storage" / "models"
    assert (models / "test_model" / "model.keras").is_file()
    assert (models / "test_model").resolve() == (models / meta["model_dir"]).resolve()
    lineage = meta["lineage"]
    assert lineage["dataset"]["tag"] == "v2.0.0" and len(lineage["dataset"]["dvc_md5"]) >= 32
    assert len(lineage["dataset"]["git_commit"]) == 40 and len(lineage["config_hash"]) == 16
    assert [n.split("/")[-1] for n in lineage["notebooks"]] == [f"{t}.ipynb" for t in TASKS]
    assert all((project.path / n).exists() for n in lineage["notebooks"])
    assert meta["model"]["classes"][0] == "T-shirt_top" and "path" not in meta["model"]
    assert meta["metrics"]["accuracy"] == metrics["accuracy"]

    client, run = _mlflow_run(project, lineage["mlflow"]["run_id"])
    assert run.data.params["train.epochs"] == "1" and run.data.tags["dataset.tag"] == "v2.0.0"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 1
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    logged = {a.path for d in ("notebooks", "upstream", "evaluation", "model") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"notebooks/train.html", "notebooks/publish.ipynb", "upstream/deepchecks_report.html",
            "evaluation/confusion_matrix.png", "model/model.keras"} <= logged

    # nothing changed: nothing reruns
    again = project.run("ploomber", "build")
    assert project.ran_tasks(again.stdout) == {t: False for t in TASKS}, again.stdout

    # one training hyper-parameter changed: train and what depends on it rerun, not the data tasks
    cfg = base_config(dataset={"path": str(tiny_fashion_repo)}, train={"learning_rate": 0.001})
    project.write_config(cfg)
    changed = project.run("ploomber", "build")
    assert project.ran_tasks(changed.stdout) == {"prepare_data": False, "validate_data": False,
                                                 "train": True, "evaluate": True, "publish": True}, changed.stdout
    assert _metadata(project, "test_model")["version"] != meta["version"]
    assert (models / meta["model_dir"] / "model.keras").is_file()  # the previous version stays for rollback


def test_another_dataset_colour_mixed_sizes_without_dvc(project):
    "A user's own dataset in the documented layout, pointed at by the config alone."
    classes = ["circle", "square", "triangle"]
    make_synthetic_dataset(project.path / "data" / "shapes", classes, n_per_class_per_split=(40, 10, 12),
                           colour=True, sizes=(20, 60), seed=1)
    (project.path / "data" / "shapes" / "annotation_df.csv").unlink()  # labels from the folders alone
    project.write_config(base_config(
        model={"model_name": "shapes", "input_size": {"w": 32, "h": 32}, "channels": 3},
        dataset={"name": "shapes", "path": "data/shapes", "tag": None, "dvc_checkout": False},
        train={"epochs": 8, "batch_size": 16, "learning_rate": 0.003}, validate={"n_samples": None}))
    project.run("cvops", "build")
    meta = _metadata(project, "shapes")
    assert meta["model"]["classes"] == classes and meta["model"]["channels"] == 3
    assert meta["metrics"]["n_images"] == 36 and meta["metrics"]["accuracy"] >= 0.6, meta["metrics"]
    assert meta["lineage"]["dataset"]["tag"] is None


def test_multilabel_sigmoid_config(project):
    "A multi-label (sigmoid) config trains, evaluates and publishes with no code change."
    classes = ["red", "green", "blue", "yellow"]
    make_synthetic_dataset(project.path / "data" / "ml", classes, n_per_class_per_split=(30, 8, 8),
                           multilabel=True, colour=True, sizes=(32, 48), seed=2)
    ann = pd.read_csv(project.path / "data" / "ml" / "annotation_df.csv")
    assert (ann[classes].sum(axis=1) > 1).any()
    project.write_config(base_config(
        model={"model_name": "multi", "input_size": {"w": 32, "h": 32}, "channels": 3,
               "multilabel": True, "classifier_activation": "sigmoid"},
        dataset={"name": "ml", "path": "data/ml", "tag": None, "dvc_checkout": False},
        train={"epochs": 5, "batch_size": 16, "learning_rate": 0.003}, validate={"blocking_checks": []}))
    project.run("cvops", "build")
    metrics = json.loads((project.path / "products" / "evaluate" / "metrics.json").read_text())
    assert set(metrics) >= {"accuracy", "macro_f1", "macro_roc_auc"}
    assert np.isfinite(metrics["macro_roc_auc"]) and metrics["macro_roc_auc"] > 0.6, metrics
    assert _metadata(project, "multi")["model"]["multilabel"] is True


def test_blocking_data_check_stops_the_pipeline(project):
    "A failed blocking DeepChecks condition stops the build, names the check, publishes nothing."
    classes = ["a", "b", "c"]
    root = project.path / "data" / "skewed"
    make_synthetic_dataset(root, classes, n_per_class_per_split=(30, 5, 30), seed=3)
    ann = pd.read_csv(root / "annotation_df.csv")
    keep = (ann.split != "test") | (ann["a"] == 1)  # the test split holds one class only
    for p in ann[~keep].path:
        (root / p).unlink()
    ann[keep].to_csv(root / "annotation_df.csv", index=False)
    project.write_config(base_config(
        model={"model_name": "skewed", "input_size": {"w": 24, "h": 24}, "channels": 3},
        dataset={"name": "skewed", "path": "data/skewed", "tag": None, "dvc_checkout": False}))
    before = project.storage_snapshot()
    proc = project.run("cvops", "build", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "data validation failed: blocking check(s) Label Drift failed" in out
    last = proc.stderr.strip().splitlines()[-1]  # the CLI ends with the cause, in one line
    assert last.startswith("error: the pipeline failed (DataValidationError: data validation failed: "
                           "blocking check(s) Label Drift failed"), last
    assert project.storage_snapshot() == before
    assert not (project.path / "products" / "train" / "model").exists()
