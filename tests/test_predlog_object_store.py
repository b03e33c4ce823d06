"""The prediction log's images on the object store (`CVOPS_CENTRAL_STORAGE=s3://bucket/prefix`), through real processes:
a real SeaweedFS (`cvops.testing.SeaweedFS`) and the real service (`cvops serve`, 2 workers) on free ports of 127.0.0.1.

- every logged image lands, as uploaded, at `<central>/predictions/images/<image_path of its row>`, none stays on the
  replica's disk, and the dashboards' data functions (`open_sources`, `gradcam_overlays`) read them back from there;
- while the store is down, every prediction is answered and every row is written with its `image_path`; the images
  wait in the replica's staging folder and are uploaded once the store is back (SeaweedFS restarted on its data);
- an image still staged when the service stops (the store down) is uploaded by `cvops log replay`;
- retention (`run_retention`, as the service's workers run it) deletes the images not seen for the retention period
  on the store, and keeps the one posted again since.
"""
import subprocess
import time
import uuid

import numpy as np
import pytest
import s3fs

from cvops.monitoring.dashboard_data import gradcam_overlays, open_sources, serving_version
from cvops.predlog.images import ObjectImageStore
from cvops.predlog.queries import prediction_rows
from cvops.predlog.writer import run_retention
from cvops.serving.inference import load_version
from cvops.settings import load_settings
from cvops.testing import (BIN, Service, encode, publish_version, seaweedfs_or_need, service_project, tiny_images, untrained_model,
                           wait_predictions_logged)


@pytest.fixture
def weed(tmp_path):
    "This test's own SeaweedFS: it stops it and starts it again."
    store = seaweedfs_or_need(tmp_path / "seaweedfs")
    with store: yield store


def wait_for(what: str, check, timeout: float = 90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = check()
        if out: return out
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def post(svc, images) -> list:
    "POST each image; the answers' request ids (every one must be 200) and the client-side seconds of the slowest."
    answers = [svc.predict(b, heatmap=False) for b in images]
    assert [a.status_code for a in answers] == [200] * len(images), [a.text[:200] for a in answers if a.status_code != 200]
    return [a.json()["request_id"] for a in answers], max(a.elapsed.total_seconds() for a in answers)


def test_logged_images_on_the_object_store(weed, tmp_path, monkeypatch):
    from cvops.quiet import quiet_tensorflow
    quiet_tensorflow()   # this process builds the model and draws the overlays: no TensorFlow start-up lines in the report
    central = f"s3://{weed.bucket}/central-{uuid.uuid4().hex[:8]}"
    root = service_project(tmp_path / "project")
    db_url = f"sqlite:///{root / 'var' / 'cvops.db'}"
    env = {**weed.env(), "CVOPS_CENTRAL_STORAGE": central}
    for k, v in {**env, "DB_URL": db_url, "CVOPS_ROOT": str(root), "CVOPS_VAR_DIR": str(tmp_path / "reader-var")}.items():
        monkeypatch.setenv(k, v)   # this process: publishes the version, then reads as the dashboards do
    m = untrained_model(tmp_path)
    version = publish_version(central, m.folder, "tiny", classes=m.classes, deploy=True)
    fs = s3fs.S3FileSystem(key=weed.access_key, secret=weed.secret_key, client_kwargs={"endpoint_url": weed.endpoint},
                           skip_instance_cache=True, use_listings_cache=False)
    prefix = f"{central.removeprefix('s3://')}/predictions/images"
    def on_store() -> set:
        return {p[len(prefix) + 1:] for p in fs.find(prefix + "/")}
    staging = root / "var" / "predictions" / "images"
    def staged() -> list: return [p for p in staging.glob("*/*") if not p.name.startswith(".")]
    first = [encode(im) for im in tiny_images([0, 1, 2] * 3, seed=11)]
    second = [encode(im) for im in tiny_images([0, 1, 2] * 2, seed=12)]
    svc = Service(root, workers=2, db_url=db_url, env=env)
    try:
        svc.start(timeout=300).wait_workers_ready(version, timeout=120)

        # 1. the images of the predictions are on the object store, as uploaded, under their rows' image_path
        ids, _ = post(svc, first)
        wait_predictions_logged(db_url, len(ids), timeout=60)
        src = open_sources(load_settings())
        assert isinstance(src.images, ObjectImageStore), src.images
        rows = prediction_rows(src.engine, version)
        paths = dict(zip(rows.request_id, rows.image_path))
        assert set(paths) == set(ids) and all(paths.values()), paths
        wait_for("the first images on the object store", lambda: on_store() >= set(paths.values()))
        for rid, data in zip(ids, first): assert fs.cat(f"{prefix}/{paths[rid]}") == data, rid
        wait_for("the staging folder emptied", lambda: not staged(), 30)
        assert not (root / "central_storage" / "predictions").exists()     # nothing in a local central storage
        uploaded_first = time.time()

        # the dashboards read them back from the store: a GradCAM overlay for every row
        serving = serving_version(src.storage)
        lv = load_version(serving.folder, serving.metadata)
        items = gradcam_overlays(rows, src.images, lv)
        assert [i["problem"] for i in items] == [None] * len(ids) and all(i["overlay"] for i in items), [i["problem"] for i in items]

        # 2. the store down: every prediction answered, every row written with its image_path; the images wait on disk
        time.sleep(2)
        weed.stop()
        ids2, slowest = post(svc, second)
        wait_predictions_logged(db_url, len(ids) + len(ids2), timeout=60)
        rows = prediction_rows(src.engine, version)
        paths = dict(zip(rows.request_id, rows.image_path))
        assert all(paths[r] for r in ids2)
        wait_for("the images of the outage staged", lambda: len(staged()) == len(ids2), 60)
        wait_for("the uploader's warning", lambda: "logged images: cannot upload to s3://" in svc.read_log(10**7), 60)

        # the store back: the staged images are uploaded and leave the disk; the first image is posted again (seen again)
        weed.start()
        wait_for("the outage's images uploaded", lambda: not staged() and on_store() >= {paths[r] for r in ids2}, 120)
        again, _ = post(svc, first[:1])
        wait_predictions_logged(db_url, len(ids) + len(ids2) + 1, timeout=60)
        wait_for("the image posted again uploaded again", lambda: not staged(), 60)   # its new upload renews the object
        assert "the object store takes them again" in svc.read_log(10**7)

        # the store down when the service stops: the image stays staged; `cvops log replay` uploads it later
        weed.stop()
        last, _ = post(svc, [encode(tiny_images([1], seed=13)[0])])
        wait_predictions_logged(db_url, len(ids) + len(ids2) + 2, timeout=60)
        wait_for("the last image staged", lambda: len(staged()) == 1, 60)
    finally: svc.stop()
    assert len(staged()) == 1
    weed.start()
    replay = subprocess.run([str(BIN / "cvops"), "log", "replay"], cwd=root, env=svc.env, capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0 and f"uploaded 1 images staged in {staging}" in replay.stdout, replay.stdout + replay.stderr
    rows = prediction_rows(src.engine, version)
    paths = dict(zip(rows.request_id, rows.image_path))
    assert not staged() and paths[last[0]] in on_store()

    # 3. retention on the store, as a worker runs it: what was last uploaded before the outage goes, the rest stays
    keep = {paths[r] for r in ids2} | {paths[ids[0]], paths[last[0]]}
    days = (time.time() - uploaded_first - 1) / 86400            # the cutoff: 1 s after the first images were on the store
    out = run_retention(tmp_path / "retention.lock", 0, src.engine, src.images, days, 0, force=True)
    assert out["images"] == len(ids) - 1 and on_store() == keep, (out, on_store(), keep)
    items = gradcam_overlays(prediction_rows(src.engine, version), src.images, lv)
    problems = [i["problem"] for i in items]
    assert problems.count(ObjectImageStore.missing) == len(ids) - 1 and problems.count(None) == len(keep) + 1, problems
    src.engine.dispose()
    print(f"\n{len(ids)} images on {central}/predictions/images, read back by the dashboards; {len(ids2)} predictions "
          f"answered while the store was down (slowest {slowest * 1000:.0f} ms), uploaded once it was back; retention deleted "
          f"{out['images']} images not seen since before the outage, kept {len(keep)}; `cvops log replay` uploaded the one "
          f"staged when the service stopped during a second outage")
