"""Secure defaults, through the real processes: production mode refuses sample credentials (service
and monitor, naming each one); POST /feedback takes FEEDBACK_TOKEN; the client address in the log
comes from X-Forwarded-For of trusted proxies only (FORWARDED_ALLOW_IPS)."""
import os
import subprocess
import time

import pytest
import requests
import sqlalchemy as sa

from cvops.testing import BIN, Service, encode, publish_version, train_small_model

pytestmark = pytest.mark.service

SAMPLE_ENV = {"CVOPS_ENV": "production", "ADMIN_TOKEN": "change-me-admin-token", "FEEDBACK_TOKEN": "",
              "DB_URL": "postgresql+psycopg2://cvops:change-me@127.0.0.1:1/cvops"}


def _run(args, root, env, timeout=120):
    full = {**os.environ, "CVOPS_ROOT": str(root), "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    full.pop("CVOPS_CENTRAL_STORAGE", None)
    return subprocess.run([str(BIN / "cvops"), *args], cwd=root, env=full, text=True, capture_output=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_production_refuses_sample_credentials(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "config.yaml").write_text("monitor: {}\n")
    serve = _run(["serve", "--port", "1"], tmp_path, SAMPLE_ENV)
    assert serve.returncode == 2, serve.stdout + serve.stderr
    for named in ("ADMIN_TOKEN still has a sample value", "the password in DB_URL still has a sample value", "FEEDBACK_TOKEN is empty"):
        assert named in serve.stderr, serve.stderr
    assert not (tmp_path / "var" / "service.pid").exists()
    monitor = _run(["monitor"], tmp_path, SAMPLE_ENV)
    assert monitor.returncode != 0 and "the password in DB_URL still has a sample value" in monitor.stderr, monitor.stderr
    assert "ADMIN_TOKEN" not in monitor.stderr          # the monitor is refused for what it uses, not the service's tokens
    env = {**os.environ, "CVOPS_ROOT": str(tmp_path), **SAMPLE_ENV}
    dashboards = subprocess.run([str(BIN / "python"), "-c", "from cvops.monitoring.dashboard_data import open_sources; open_sources()"],
                                cwd=tmp_path, env=env, text=True, capture_output=True, timeout=120)
    assert dashboards.returncode != 0 and "the dashboards cannot start" in dashboards.stderr, dashboards.stderr
    assert "the password in DB_URL still has a sample value" in dashboards.stderr
    ok = _run(["serve", "--port", "1"], tmp_path, {**SAMPLE_ENV, "CVOPS_ENV": "development"}, timeout=60)
    assert "cannot start with CVOPS_ENV" not in ok.stderr          # development mode does not check (the port then fails instead)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    trained = train_small_model(root, epochs=1, n_train=1500)
    publish_version(root / "central_storage", trained.folder, "fashion_small", trained.accuracy, deploy=True)
    return root, trained.images


def _client_of(root, request_id):
    from cvops.predlog.schema import api_log, make_engine
    from cvops.settings import default_db_url
    eng = make_engine(default_db_url(root))
    try:
        for _ in range(50):
            with eng.connect() as c:
                row = c.execute(sa.select(api_log.c.client).where(api_log.c.request_id == request_id)).first()
            if row: return row[0]
            time.sleep(0.1)
    finally: eng.dispose()
    raise AssertionError(f"no api_log row for {request_id}")


def test_feedback_token_and_trusted_proxy(published):
    root, xt = published
    svc = Service(root, workers=1, env={"FEEDBACK_TOKEN": "fb-test-token-123"}).start(wait_for="/ready")
    try:
        r = requests.post(svc.url("/predict"), files={"file": ("x.png", encode(xt[0]), "image/png")},
                          headers={"X-Forwarded-For": "203.0.113.7"}, timeout=30)
        assert r.status_code == 200, r.text
        rid = r.json()["request_id"]
        assert _client_of(root, rid) == "203.0.113.7"      # default FORWARDED_ALLOW_IPS: a proxy on this host is trusted
        body = {"request_id": rid, "labels": [r.json()["top_class"]]}
        assert requests.post(svc.url("/feedback"), json=body, timeout=30).status_code == 401
        wrong = requests.post(svc.url("/feedback"), json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 403 and "wrong feedback token" in wrong.json()["error"]
        good = requests.post(svc.url("/feedback"), json=body, headers={"Authorization": "Bearer fb-test-token-123"}, timeout=30)
        assert good.status_code == 200, good.text
    finally:
        svc.stop()
    svc = Service(root, workers=1, env={"FORWARDED_ALLOW_IPS": "10.9.9.9"}).start(wait_for="/ready")
    try:
        r = requests.post(svc.url("/predict"), files={"file": ("x.png", encode(xt[1]), "image/png")},
                          headers={"X-Forwarded-For": "203.0.113.8"}, timeout=30)
        assert r.status_code == 200, r.text
        assert _client_of(root, r.json()["request_id"]) == "127.0.0.1"   # not a trusted proxy: its header is ignored
        assert requests.post(svc.url("/feedback"), json={"request_id": r.json()["request_id"], "labels": [r.json()["top_class"]]},
                             timeout=30).status_code == 200               # no FEEDBACK_TOKEN: open, as before
    finally:
        svc.stop()
