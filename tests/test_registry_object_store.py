"""Central storage on an S3-compatible object store (`CVOPS_CENTRAL_STORAGE=s3://bucket/prefix`), against a real
SeaweedFS (`cvops.testing.SeaweedFS`): publish, list, deploy, the pointer and its history; a publish that dies half-way
is never seen; the real service (`cvops serve`) loads the deployed version from the store and follows a `cvops deploy`;
`cvops models` lists the store's versions."""
import json
import subprocess
import time
import uuid

import numpy as np
import pytest
import s3fs

from cvops.registry.deploy import deploy
from cvops.registry.publish import prune_versions
from cvops.registry.versions import (current_deployment, current_version, deployment_history, published_models,
                                     published_versions, resolve_version)
from cvops.testing import BIN, Service, encode, publish_version, seaweedfs_or_need, service_project, untrained_model


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    store = seaweedfs_or_need(tmp_path_factory.mktemp("seaweedfs"))
    with store: yield store


@pytest.fixture
def central(weed, tmp_path, monkeypatch):
    "A fresh `s3://` central storage (its own prefix) with this process's environment pointing at the store."
    for k, v in weed.env().items(): monkeypatch.setenv(k, v)
    monkeypatch.setenv("CVOPS_VAR_DIR", str(tmp_path / "var"))
    return f"s3://{weed.bucket}/central-{uuid.uuid4().hex[:8]}"


def raw(weed):
    "The store as s3fs sees it, bypassing cvops."
    return s3fs.S3FileSystem(key=weed.access_key, secret=weed.secret_key, client_kwargs={"endpoint_url": weed.endpoint},
                             skip_instance_cache=True, use_listings_cache=False)


def test_publish_list_deploy_pointer_and_history_on_the_object_store(weed, central, tmp_path):
    m = untrained_model(tmp_path)
    v1 = publish_version(central, m.folder, "tiny", accuracy=0.9, classes=m.classes)
    v2 = publish_version(central, m.folder, "tiny", accuracy=0.8, classes=m.classes)
    assert (published_models(central), published_versions(central, "tiny"), current_version(central, "tiny")) == (["tiny"], [v1, v2], v2)
    version, folder = resolve_version(central, "tiny")                       # the latest pointer's version, copied locally once
    assert version == v2 and folder == tmp_path / "var" / "cache" / "versions" / v2
    assert sorted(p.name for p in folder.iterdir()) == sorted([*(p.name for p in m.folder.iterdir()), "metadata.yaml"])
    assert current_deployment(central) is None
    deploy(central, "tiny", v1, by="tests", reason="first")
    deploy(central, "tiny", by="tests", reason="the latest")
    assert current_deployment(central)["version"] == v2 and current_deployment(central)["previous_version"] == v1
    assert [(r["version"], r["reason"]) for r in deployment_history(central)] == [(v2, "the latest"), (v1, "first")]
    fs, base = raw(weed), central.removeprefix("s3://")
    assert json.loads(fs.cat(f"{base}/models/tiny.latest.json"))["version"] == v2
    assert fs.exists(f"{base}/models/_versions/{v1}/metadata.yaml")             # `.versions` is stored as `_versions`
    assert json.loads(fs.cat(f"{base}/deployments/current.json"))["version"] == v2
    assert not fs.exists(f"{base}/deployments/.lock")                          # the deploy lock object is released
    v3 = publish_version(central, m.folder, "tiny", accuracy=0.8, classes=m.classes)
    v4 = publish_version(central, m.folder, "tiny", accuracy=0.8, classes=m.classes)
    assert prune_versions(central, "tiny", keep=1) == [v3]       # never the deployed one, the one it replaced, the current one
    gone = f"{base}/models/_versions/{v3}"
    assert published_versions(central, "tiny") == [v1, v2, v4] and [p for p in fs.find(gone) if p.rstrip("/") != gone] == []  # (SeaweedFS may keep the empty folder)
    print(f"published {v1}, {v2}, {v3}, {v4}; deployed twice; history {len(deployment_history(central))} rows; pruned {v3}")


def test_a_publish_that_dies_half_way_is_never_seen(weed, central, tmp_path, monkeypatch, request):
    """The upload fails after one file of the model (s3fs's low-level put of one file raises, as a lost connection would); a second
    time the process also "dies" before it can clean up. Neither version is listed, resolved or current."""
    import cvops.registry.publish as publish
    m = untrained_model(tmp_path)
    v1 = publish_version(central, m.folder, "tiny", accuracy=0.9, classes=m.classes)
    real_put, puts = s3fs.S3FileSystem._put_file, []

    async def put_then_crash(self, lpath, rpath, *a, **kw):
        puts.append(rpath)
        if len(puts) > 1: raise ConnectionError("simulated crash in the middle of the upload")
        return await real_put(self, lpath, rpath, *a, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", put_then_crash)
    request.addfinalizer(s3fs.S3FileSystem.clear_instance_cache)   # no file system bound to the patched put outlives the test
    s3fs.S3FileSystem.clear_instance_cache()        # file systems made from now on bind the patched put
    fs, base = raw(weed), central.removeprefix("s3://")
    with pytest.raises(OSError, match="simulated crash"): publish_version(central, m.folder, "tiny", accuracy=0.9, classes=m.classes)
    assert [p for p in fs.find(f"{base}/models/_versions/") if v1 not in p] == []    # cleaned up after itself
    monkeypatch.setattr(publish, "remove", lambda *a, **kw: None)                    # this time the process dies: no clean-up
    puts.clear()
    with pytest.raises(OSError, match="simulated crash"): publish_version(central, m.folder, "tiny", accuracy=0.9, classes=m.classes)
    leftovers = [p for p in fs.find(f"{base}/models/_versions/") if v1 not in p]
    assert len(leftovers) == 1 and not any(p.endswith("metadata.yaml") for p in leftovers), leftovers
    assert (published_versions(central, "tiny"), current_version(central, "tiny"), resolve_version(central, "tiny")[0]) == ([v1], v1, v1)
    print(f"half-uploaded objects left by the 'dead' publish: {len(leftovers)}; visible versions: {published_versions(central, 'tiny')}")


def answer_version(svc) -> str:
    r = svc.predict(encode(np.full((28, 28), 128, np.uint8)), heatmap=False)
    assert r.status_code == 200, r.text
    return r.json()["model_version"]


def cli(root, env, *args) -> subprocess.CompletedProcess:
    p = subprocess.run([str(BIN / "cvops"), *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_the_service_loads_from_the_object_store_and_follows_a_cli_deploy(weed, central, tmp_path):
    root = service_project(tmp_path / "project")
    m = untrained_model(tmp_path)
    v1 = publish_version(central, m.folder, "tiny", classes=m.classes, deploy=True)
    v2 = publish_version(central, m.folder, "tiny", classes=m.classes)
    svc = Service(root, workers=2, env={**weed.env(), "CVOPS_CENTRAL_STORAGE": central})
    try:
        svc.start(timeout=300).wait_workers_ready(v1, timeout=120)   # a loaded machine: TensorFlow starts slowly
        assert answer_version(svc) == v1
        env = {**svc.env, "CVOPS_ROOT": str(root)}
        assert f"deployed {v2} (was {v1})" in cli(root, env, "deploy", "tiny", "--version", v2).stdout
        deadline = time.time() + 60
        while time.time() < deadline and {answer_version(svc) for _ in range(6)} != {v2}: time.sleep(0.5)
        assert {answer_version(svc) for _ in range(6)} == {v2}, svc.read_log()
        models = cli(root, env, "models").stdout
        assert f"tiny\n    {v1}\n  * {v2}" in models, models
    finally: svc.stop()
    assert sorted(p.name for p in (root / "var" / "cache" / "versions").iterdir()) == [v1, v2]   # each version downloaded once
    assert list((root / "central_storage" / "models").iterdir()) == []                     # nothing went to a local folder
    print(f"served {v1}, then {v2} after `cvops deploy`; `cvops models`:\n{models}")


def test_mlflow_server_keeps_artefacts_on_the_object_store(weed, tmp_path):
    """The compose stack's MLflow server with `--artifacts-destination s3://<bucket>/mlflow` and MLFLOW_S3_ENDPOINT_URL
    (boto3 underneath): an artefact a client logs through the server lands in SeaweedFS."""
    import os
    import requests
    from mlflow import MlflowClient
    from cvops.testing import free_port
    port = free_port()
    env = {**os.environ, **weed.env(), "MLFLOW_S3_ENDPOINT_URL": weed.endpoint}
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db", "--artifacts-destination", f"s3://{weed.bucket}/mlflow"]
    log = open(tmp_path / "mlflow.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200: break
            except requests.RequestException: time.sleep(0.5)
        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        run = client.create_run(client.create_experiment("object-store"))
        client.log_text(run.info.run_id, "hello from cvops", "notes/hello.txt")
        found = [p for p in raw(weed).find(f"{weed.bucket}/mlflow/") if p.endswith("notes/hello.txt")]
        assert len(found) == 1 and raw(weed).cat(found[0]) == b"hello from cvops", (found, (tmp_path / "mlflow.log").read_text()[-3000:])
        print(f"MLflow artefact stored as s3://{found[0]}")
    finally:
        import signal
        os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(20)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait(10)
        log.close()


def test_the_monitor_and_dashboards_read_the_serving_version_from_the_object_store(central, tmp_path):
    "The deployed version's drift detectors and reference data come from its local copy of the object store's version."
    from cvops.monitoring.dashboard_data import reference_frame, serving_version
    from cvops.registry.versions import version_detectors
    from cvops.testing import tiny_version
    tv = tiny_version(central, deploy=True, work=tmp_path / "work")
    serving = serving_version(central)
    assert serving.version == tv.version and serving.folder == tmp_path / "var" / "cache" / "versions" / tv.version == tv.folder
    assert sorted(version_detectors(serving.folder, "tiny")) == ["bbsd", "uae"]
    ref = reference_frame(serving)
    assert ref is not None and len(ref) > 0
    print(f"serving {serving.version} from the object store: {len(ref)} reference rows, detectors {sorted(version_detectors(serving.folder, 'tiny'))}")
