"""`cvops dataset add-feedback` as a user runs it: the real command in a project folder whose prediction log is a
throw-away PostgreSQL cluster (fixture `pg`) and whose logged images are in central storage, adding to a small
git + DVC dataset repository. The details (rollback, refusals, idempotence, provenance) are checked in
notebooks/lib/data/06_feedback.ipynb, the command's arguments and user errors in notebooks/lib/90_cli.ipynb; this
checks the wiring end to end: settings from the environment, the config's dataset, the output. (Its time is mostly
DVC's start-up, about 3 s of CPU per `dvc` command.)"""
import csv
import io
import os
import subprocess

import numpy as np
import yaml
from PIL import Image

from conftest import BIN, base_config
from cvops.data.dataset import git, list_git_tags, synthetic_dataset_repo, synthetic_image
from cvops.predlog.images import ImageStore
from cvops.predlog.schema import make_engine, migrate
from cvops.testing import CALLER_SETTINGS, log_labelled_predictions, service_project

CLASSES = ["ellipse", "rectangle", "triangle"]


def image_file(k: int, fmt: str, seed: int) -> bytes:
    out = io.BytesIO()
    synthetic_image(np.eye(len(CLASSES), dtype=int)[k], (32, 28), rng=np.random.default_rng(seed)).save(out, fmt)
    return out.getvalue()


def cvops(root, db_url, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in CALLER_SETTINGS}
    env.update(CVOPS_ROOT=str(root), DB_URL=db_url)
    return subprocess.run([str(BIN / "cvops"), "dataset", "add-feedback", *args], cwd=root, env=env, text=True,
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


def test_add_feedback_command_makes_a_version_from_the_postgresql_log(tmp_path, pg):
    root = service_project(tmp_path / "project")
    (root / "configs").mkdir()
    (root / "configs" / "config.yaml").write_text(yaml.safe_dump(base_config(dataset={"path": "datasets/shapes"})))
    ds = synthetic_dataset_repo(root / "datasets" / "shapes", root / "datasets" / ".remote", CLASSES, (2, 1, 1))
    engine = make_engine(pg.url)
    migrate(engine)
    rows = log_labelled_predictions(engine, ImageStore(root / "central_storage" / "predictions" / "images"), [
        dict(image=image_file(1, "PNG", 1), labels=["rectangle"], source="ui"),
        dict(image=image_file(2, "JPEG", 2), fmt="JPEG", labels=["triangle"]),
        dict(image=image_file(0, "PNG", 3), labels=["hexagon"])])
    engine.dispose()

    first = cvops(root, pg.url, "--since", "2000-01-01", "--model-name", "tiny")   # the dataset of configs/config.yaml
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith(f"v2.1.0: 2 feedback-labelled images added to the train split of {ds} (on v2.0.0; commit "), lines
    assert lines[1] == "  per class: rectangle 1, triangle 1", lines
    assert lines[2] == f"  skipped 1 example whose labels do not fit the dataset: {rows[2]['request_id']} (not among the dataset's classes: hexagon)"
    assert lines[-1] == ("next: set `dataset.tag: v2.1.0` in configs/config.yaml, then `cvops build --config configs/config.yaml` "
                         "trains, evaluates and gates a candidate on the new version"), lines
    assert first.stderr == "", first.stderr                      # no progress bar or library noise off a terminal
    assert list_git_tags(ds) == ["v2.0.0", "v2.1.0"] and git(ds, "status", "--porcelain") == ""
    assert git(ds, "rev-parse", "HEAD") == git(ds, "rev-parse", "v2.1.0^{commit}")
    with (ds / "feedback_provenance.csv").open(newline="") as f:
        prov = list(csv.DictReader(f))
    assert [(p["request_id"], p["labels"], p["feedback_source"], p["added_in"]) for p in prov] == [
        (rows[0]["request_id"], '["rectangle"]', "ui", "v2.1.0"), (rows[1]["request_id"], '["triangle"]', "", "v2.1.0")]
    assert Image.open(ds / prov[1]["path"]).format == "JPEG"
    tail = (ds / "annotation_df.csv").read_text().splitlines()[-2:]
    assert tail == [f"images/feedback/{rows[0]['request_id']}.png,train,0,1,0", f"images/feedback/{rows[1]['request_id']}.jpg,train,0,0,1"]

