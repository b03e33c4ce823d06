"""End to end: the real pipeline (papermill notebooks under Ploomber) on small configs, and
its products: rendered notebooks, the DeepChecks report, MLflow runs, central storage."""
import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import base_config
from cvops.data.dataset import make_synthetic_dataset
from cvops.testing import Service

pytestmark = pytest.mark.e2e
TASKS = ["prepare_data", "validate_data", "train", "drift_detectors", "evaluate", "publish"]  # the tasks whose records a version keeps
ALL_TASKS = [t["name"] for t in yaml.safe_load((Path(__file__).resolve().parents[1] / "pipeline.yaml").read_text())["tasks"]]


def _metadata(project, name):
    return yaml.safe_load((project.path / "central_storage" / "models" / f"{name}.yaml").read_text())


# Every line `cvops build` may print: its header, a line per task, the train task's epochs, the closing summary.
BUILD_LINE = re.compile(r"building the pipeline with \S+ \(.*\)|  \w+ +(ran in [\d.]+ s|ran in \d+ min \d\d s|up to date)"
                        r"|  train +epoch \d+/\d+  val_accuracy [\d.]+  val_loss [\d.]+  \([\d.]+ s\)"
                        r"|pipeline built in .+: \d+ of \d+ tasks ran.*|  (test accuracy|deployed version|rendered notebooks): +\S.*")


def check_quiet_build(project, proc, tasks):
    """`cvops build`'s console holds its own lines only: no library warning, traceback, TensorFlow/CUDA start-up line,
    papermill or Ploomber progress bar, kernel message ("Task was destroyed but it is pending!"); nothing on stderr.
    What the notebooks' kernels wrote outside their cells is in var/kernels.log, a header per kernel."""
    assert proc.stderr == "", proc.stderr[-3000:]
    stray = [line for line in proc.stdout.splitlines() if not BUILD_LINE.fullmatch(line)]
    assert not stray, f"lines cvops build should not print: {stray[:20]}"
    assert re.search(r"^  test accuracy: +0\.\d{4} \(products/\w+/evaluate/metrics\.json\)$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^  train +epoch 1/1  val_accuracy", proc.stdout, re.M), proc.stdout
    kernels = (project.path / "var" / "kernels.log").read_text()
    assert kernels.count(" UTC: kernel python3 started in ") == len(tasks), kernels[-3000:]


NOISE = re.compile(r"cuda|onednn|absl|WARNING|Warning:|tensorflow/core|E0000", re.I)
BASE64 = re.compile(r"base64,[A-Za-z0-9+/=\s]+")


def _outputs_text(nb: dict) -> str:
    "Everything the code cells of an executed notebook printed or displayed as text (not images)."
    out = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            out.append("".join(o.get("text", "")))
            out.extend("".join(v) if isinstance(v, list) else str(v) for k, v in o.get("data", {}).items() if k.startswith("text/"))
            out.extend(o.get("traceback", []))
    return "\n".join(out)


def _stream_lines(nb: dict) -> list:
    return [l for c in nb["cells"] for o in c.get("outputs", []) if o["output_type"] == "stream"
            for l in "".join(o["text"]).replace("\r", "\n").splitlines() if l.strip()]


def _injected_parameters(path) -> str:
    "The source of the parameters cell papermill injected into an executed notebook."
    cells = json.loads(path.read_text())["cells"]
    return "".join(next(c["source"] for c in cells if "injected-parameters" in c["metadata"].get("tags", [])))


def _mlflow_run(project, run_id):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project.path / 'mlruns' / 'mlflow.db'}")
    return client, client.get_run(run_id)


def test_default_pipeline_on_a_tiny_dvc_dataset(project, tiny_fashion_repo):
    """Fashion-MNIST as a git + DVC repo, one epoch: every product, lineage, MLflow, incremental rebuilds; then a second
    model name beside it, and a dataset moved under its feet."""
    # one-epoch models differ by chance: the deploy task's regression gate is not what this test is about
    no_gate = {"max_regression": 1.0}
    # a retraining policy as the default config has (the monitor's section: unused by the pipeline, and no warning about it)
    project.write_config(base_config(dataset={"path": str(tiny_fashion_repo)}, deploy=no_gate, retrain={"drift_runs": 2}))
    build = project.run("cvops", "build")
    assert project.ran_tasks(build.stdout) == {t: True for t in ALL_TASKS}, build.stdout
    check_quiet_build(project, build, ALL_TASKS)

    products = project.products("test_model")
    assert sorted(p.name for p in (project.path / "products").iterdir()) == ["test_model"]
    for task in TASKS:  # every task keeps its rendered notebook, also as HTML
        nb = json.loads((products / task / f"{task}.ipynb").read_text())
        assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), task
        html = (products / task / f"{task}.html").read_text()
        assert "<html" in html[:2000].lower()
        # a report, not a log: no TensorFlow/CUDA/absl start-up lines, no library warnings
        assert not NOISE.findall(_outputs_text(nb)), (task, NOISE.findall(_outputs_text(nb)))
        assert not re.findall(r"cuda|onednn|absl", BASE64.sub("", html), flags=re.I), task
        assert not any(o.get("name") == "stderr" for c in nb["cells"] for o in c.get("outputs", [])), task
    assert not re.findall(r"cuda|onednn|absl|cuInit", build.stdout + build.stderr, flags=re.I), build.stderr[-3000:]
    train_nb = json.loads((products / "train" / "train.ipynb").read_text())
    bars = [l for l in _stream_lines(train_nb) if "batch/s" in l or "/13 [" in l]
    assert len(bars) == 1 and "13/13" in bars[0], _stream_lines(train_nb)  # the progress bar leaves one line
    epoch_table = [o["data"]["text/html"] for c in train_nb["cells"] for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert any("val_accuracy" in "".join(t) and "seconds" in "".join(t) and "epoch" in "".join(t) for t in epoch_table)
    assert any("image/png" in o.get("data", {}) for c in train_nb["cells"] for o in c.get("outputs", []))  # the curves
    assert (products / "validate_data" / "deepchecks_report.html").stat().st_size > 100_000
    assert (products / "evaluate" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert (products / "evaluate" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    calibration = json.loads((products / "evaluate" / "calibration.json").read_text())   # fitted on valid, judged on test
    assert calibration["method"] in ("temperature", "identity") and calibration["temperature"] > 0, calibration
    assert (calibration["fitted_on"], calibration["checked_on"], calibration["n_check"]) == ("valid", "test", 200), calibration
    assert (calibration["ece_after"] < calibration["ece_before"]) == (calibration["method"] == "temperature"), calibration

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
    # the rendered notebooks that made the version live in the version folder (and in MLflow)
    storage = project.path / "central_storage"
    assert list(lineage["notebooks"]) == TASKS
    for task, rec in lineage["notebooks"].items():
        for kind in ("ipynb", "html"):
            assert rec[kind] == f"models/{meta['model_dir']}/notebooks/{task}.{kind}", rec
            assert (storage / rec[kind]).read_bytes() == (products / task / f"{task}.{kind}").read_bytes(), rec[kind]
            assert rec[f"mlflow_{kind}"] == f"runs:/{lineage['mlflow']['run_id']}/notebooks/{task}.{kind}"
    assert (models / "test_model.yaml").resolve() == (models / meta["model_dir"] / "metadata.yaml").resolve()
    assert meta["model"]["classes"][0] == "T-shirt_top" and "path" not in meta["model"]
    assert meta["metrics"]["accuracy"] == metrics["accuracy"]
    assert meta["training"]["kept_epoch"] == 1 and meta["training"]["epochs_run"] == 1
    # the calibration is part of the version: the file the monitor reads, summarised in the metadata
    assert json.loads((models / "test_model" / "calibration.json").read_text()) == calibration
    assert meta["calibration"]["temperature"] == calibration["temperature"] and meta["calibration"]["method"] == calibration["method"]

    # the drift detectors and the reference data are part of the version (the same rename)
    _check_detectors(project, meta, tiny_fashion_repo)
    # so is the golden set: held-out images as the dataset holds them, with evaluate's predictions; the deploy task checked it
    golden = json.loads((models / "test_model" / "golden" / "golden.json").read_text())
    n = len(golden["images"])
    assert meta["golden_set"] == {"path": f"models/{meta['model_dir']}/golden", "images": n, "tolerance": 1e-4, "split": "test"}
    assert 100 < n <= 200 and golden["images_evaluated"] == 200, n        # the 200 test images less the near-ties
    for im in golden["images"][:5]:
        assert (models / "test_model" / "golden" / im["file"]).read_bytes() == (tiny_fashion_repo / im["source"]).read_bytes()
    checks = json.loads((products / "deploy" / "deployment.json").read_text())["checks"]
    assert checks["golden"].startswith(f"{n} of {n} golden-set images give the predictions evaluation made"), checks
    assert checks["replay"].startswith("no recent requests to replay") and checks["warnings"] == [], checks
    # the service on this project's central storage (the deploy task deployed this version)
    # logs, for an image of the reference split, the features that cvops.monitoring.drift_detectors computes
    _check_service_features(project, meta, tiny_fashion_repo)

    client, run = _mlflow_run(project, lineage["mlflow"]["run_id"])
    assert run.data.params["train.epochs"] == "1" and run.data.tags["dataset.tag"] == "v2.0.0"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 1
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    logged = {a.path for d in ("notebooks", "upstream", "evaluation", "model") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"notebooks/train.html", "notebooks/publish.ipynb", "upstream/deepchecks_report.html",
            "evaluation/confusion_matrix.png", "evaluation/calibration.json", "evaluation/reliability.png", "model/model.keras"} <= logged
    assert run.data.metrics["calibration_temperature"] == pytest.approx(calibration["temperature"])
    assert {r[k].split("/", 2)[-1] for r in lineage["notebooks"].values() for k in ("mlflow_ipynb", "mlflow_html")} <= logged

    # nothing changed: nothing reruns
    again = project.run("ploomber", "build")
    assert project.ran_tasks(again.stdout) == {t: False for t in ALL_TASKS}, again.stdout

    # one training hyper-parameter changed: train and what depends on it rerun, not the data tasks
    cfg = base_config(dataset={"path": str(tiny_fashion_repo)}, train={"learning_rate": 0.001}, deploy=no_gate)
    project.write_config(cfg)
    changed = project.run("ploomber", "build")
    assert project.ran_tasks(changed.stdout) == {**{t: True for t in ALL_TASKS}, "prepare_data": False,
                                                 "validate_data": False}, changed.stdout
    assert _metadata(project, "test_model")["version"] != meta["version"]
    assert (models / meta["model_dir"] / "model.keras").is_file()  # the previous version stays for rollback
    # ... and its lineage is still true: its notebooks are its own, not the new build's
    old_params = _injected_parameters(storage / lineage["notebooks"]["train"]["ipynb"])
    new_params = _injected_parameters(products / "train" / "train.ipynb")
    assert '"learning_rate": 0.002' in old_params and '"learning_rate": 0.001' in new_params, (old_params, new_params)
    assert all((storage / r[k]).is_file() for r in lineage["notebooks"].values() for k in ("ipynb", "html"))

    # a second model name in the same project (one build shared with the checks above, to keep `make test` short): config B
    # neither overwrites the first model's records nor makes it rerun; a dataset moved under its feet stops its next training
    _second_model_name_keeps_its_own_products(project, tiny_fashion_repo, cfg)


def _second_model_name_keeps_its_own_products(project, tiny_fashion_repo, a):
    from cvops.data.versioning import checkout_dataset
    b = base_config(dataset={"path": str(tiny_fashion_repo)}, model={"model_name": "other_model"},
                    deploy={"force": True})  # whichever way the deploy gates see B, this is about A
    project.write_config(b, "configs/b.yaml")
    products_a = project.products("test_model")
    records_a = {p.relative_to(products_a).as_posix(): p.read_bytes() for p in products_a.rglob("*") if p.is_file()}
    assert "train/train.html" in records_a and "publish/metadata.json" in records_a
    meta_a = _metadata(project, "test_model")

    second = project.run("cvops", "build", "--config", "configs/b.yaml")
    assert project.ran_tasks(second.stdout) == {t: True for t in ALL_TASKS}, second.stdout
    assert {p.relative_to(products_a).as_posix(): p.read_bytes() for p in products_a.rglob("*") if p.is_file()} == records_a
    assert (project.products("other_model") / "train" / "train.html").is_file()
    assert _metadata(project, "other_model")["model"]["model_name"] == "other_model"

    third = project.run("cvops", "build")              # configs/config.yaml: A, built before B
    assert project.ran_tasks(third.stdout) == {t: False for t in ALL_TASKS}, third.stdout
    assert _metadata(project, "test_model")["version"] == meta_a["version"]

    # another config moved the dataset's working copy to another tag: A's next training refuses it
    checkout_dataset(tiny_fashion_repo, "v1.0.0")
    try:
        project.write_config({**a, "train": {**a["train"], "learning_rate": 0.003}})
        before = project.storage_snapshot()
        proc = project.run("cvops", "build", check=False)
    finally:
        checkout_dataset(tiny_fashion_repo, "v2.0.0")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    commit = meta_a["lineage"]["dataset"]["git_commit"][:10]
    assert re.match(rf"error: the pipeline failed \(DatasetError: dataset {re.escape(str(tiny_fashion_repo))} is now at "
                    rf"v1\.0\.0 \(\w{{10}}\), but prepare_data prepared v2\.0\.0 \({commit}\); rebuild prepare_data", last), last
    assert project.storage_snapshot() == before


def _check_detectors(project, meta, dataset_dir):
    "detectors/<name>_uae.keras, detectors/<name>_bbsd.keras, ref_data/<name>_ref_data.parquet in the version folder."
    name, folder = meta["model_name"], project.path / "central_storage" / "models" / meta["model_dir"]
    n_ref, dim, classes = 100, 32, meta["model"]["classes"]   # conftest's monitor.reference_size; the default encoding_dim
    assert {p.relative_to(folder).as_posix() for p in folder.glob("*/*") if p.parent.name in ("detectors", "ref_data")} == {
        f"detectors/{name}_uae.keras", f"detectors/{name}_bbsd.keras", f"ref_data/{name}_ref_data.parquet"}
    det = meta["detectors"]
    assert det["uae"] == f"models/{meta['model_dir']}/detectors/{name}_uae.keras" and det["reference_rows"] == n_ref
    assert det["reference_split"] == "valid" and det["encoding_dim"] == dim
    ref = pd.read_parquet(folder / "ref_data" / f"{name}_ref_data.parquet")
    assert len(ref) == n_ref and ref.path.is_unique
    assert [c for c in ref.columns if c.startswith("uae_")] == [f"uae_{j}" for j in range(dim)]
    assert [c for c in ref.columns if c.startswith("bbsd_")] == [f"bbsd_{j}" for j in range(len(classes))]
    np.testing.assert_allclose(ref[[f"bbsd_{j}" for j in range(len(classes))]].sum(axis=1), 1, atol=1e-4)  # softmax rows
    # drawn from the valid split, never train; labels are those of the images (the dataset's annotations)
    ann = pd.read_csv(dataset_dir / "annotation_df.csv").set_index("path")
    assert set(ann.loc[ref.path, "split"]) == {"valid"}
    assert list(ref.label) == list(ann.loc[ref.path, classes].idxmax(axis=1))
    assert set(ref.predicted) <= set(classes) and len(set(ref.label)) == len(classes)
    # the same as the pipeline's product, and as a fresh sample with the same seed would be
    products = project.products(name) / "drift_detectors"
    assert (products / "ref_data" / f"{name}_ref_data.parquet").read_bytes() == (folder / "ref_data" / f"{name}_ref_data.parquet").read_bytes()
    from cvops.monitoring.drift_detectors import reference_rows
    assert list(ref.path) == list(reference_rows(ann.reset_index(), "valid", n_ref, 0).path)
    nb = json.loads((products / "drift_detectors.ipynb").read_text())
    assert any("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))
    assert any("uae_0" in "".join(o.get("data", {}).get("text/html", "")) for c in nb["cells"] for o in c.get("outputs", []))


def _check_service_features(project, meta, dataset_dir):
    "The real service, one image of the reference split: the logged features are what cvops.monitoring.drift_detectors computes for its bytes."
    import keras
    import sqlalchemy as sa
    from cvops.data.preprocess import preprocess, to_model_input
    from cvops.predlog.schema import make_engine, unpack_features
    from cvops.settings import default_db_url
    name, folder = meta["model_name"], project.path / "central_storage" / "models" / meta["model_dir"]
    ref = pd.read_parquet(folder / "ref_data" / f"{name}_ref_data.parquet")
    data = (dataset_dir / ref.path[0]).read_bytes()
    svc = Service(project.path, workers=1)
    try:
        svc.start(wait_for="/ready")
        resp = svc.predict(data, filename="ref.jpg", content_type="image/jpeg", heatmap=False)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["model_version"] == meta["version"]
    finally:
        svc.stop()   # flushes the prediction log
    engine = make_engine(default_db_url(project.path))   # var/cvops.db of the project
    with engine.connect() as c:
        row = c.execute(sa.text("SELECT feature_blob, feature_dims, model_version FROM predictions WHERE request_id = :r"),
                        {"r": body["request_id"]}).one()
    features = {k: v[0] for k, v in unpack_features([row[0]], [row[1]]).items()}   # float32, as the model produced them
    assert row[2] == meta["version"] and sorted(features) == ["bbsd", "uae"]
    assert len(features["uae"]) == 32 and len(features["bbsd"]) == len(meta["model"]["classes"])
    np.testing.assert_allclose(features["bbsd"], [body["probabilities"][c] for c in meta["model"]["classes"]], atol=2e-6)
    uae = keras.models.load_model(folder / "detectors" / f"{name}_uae.keras", compile=False)
    expected = np.asarray(uae(to_model_input(preprocess(data, (28, 28), 1)[None]), training=False))[0]
    np.testing.assert_allclose(features["uae"], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(features["uae"], ref[[f"uae_{j}" for j in range(32)]].iloc[0], rtol=1e-4, atol=1e-4)  # = its reference row


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
    metrics = json.loads((project.products("multi") / "evaluate" / "metrics.json").read_text())
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
    assert not (project.products("skewed") / "train" / "model").exists()
