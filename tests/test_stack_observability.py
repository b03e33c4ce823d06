"""The production stack's observability, proven with the real programs: Debian's Prometheus (and promtool)
and prometheus-node-exporter.

- `promtool check config` / `check rules` pass on services/prometheus/, and `promtool test rules` runs
  services/prometheus/alerts.test.yml: ServiceDown, DriftAlert, HighErrorRate and MonitorStale fire on the
  series they are written for (after their `for`) and stay quiet on the others.
- The Grafana dashboard (services/grafana/dashboards/cvops.json) parses, every panel reads the provisioned
  datasource (uid `prometheus`) and has a query; the provisioning files point at it.
- End to end: a real `cvops serve` (2 workers) with nothing deployed answers 503s, then a tiny version is
  deployed over HTTP and serves predictions (with feedback) and 4xx answers; a real `cvops monitor --every`
  serves its metrics on a free port after one drift run; a real node-exporter; a real Prometheus on a config
  derived from services/prometheus/prometheus.yml (same jobs, metrics paths and rules; only the targets are
  127.0.0.1 ports, the DNS lookup of the replicas a static list, the interval 1 s). Through Prometheus's HTTP
  API every query of every dashboard panel and every metric selector of every alert rule returns at least one
  series, and every rule group is loaded. Then a worker is SIGKILLed: gunicorn's child_exit hook
  (`multiprocess.mark_process_dead`) removes its live gauges, so the replica's serving version and gauges
  come from live workers only, while its counters keep their counts.

Every process listens on 127.0.0.1 (free ports), in its own process group, stopped by the fixtures.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from cvops.testing import BIN, Service, encode, free_port, monitor_env, monitor_project, need, tiny_version, wait_predictions_logged
from cvops.rehearsal import GRAFANA_VARS, metric_selectors   # the same parsing the rehearsal uses

REPO = Path(__file__).resolve().parents[1]
PROM = REPO / "services" / "prometheus"
GRAFANA = REPO / "services" / "grafana"
JOBS = {"cvops_service", "cvops_monitor", "node", "prometheus"}
# Grafana's own variables in the dashboard's queries, as Grafana fills them in for a 1 s scrape interval and a short range
# a filesystem the node-exporter must not skip here: a CI container's root is often overlay (the Debian default excludes it)
FS_TYPES_EXCLUDE = ("^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|fusectl|hugetlbfs|iso9660|mqueue|nsfs|proc|"
                    "procfs|pstore|rpc_pipefs|securityfs|selinuxfs|squashfs|sysfs|tracefs)$")
MONITOR = {"window_days": 1, "window_rows": 40, "min_rows": 30, "alpha": 0.05, "permutations": 50, "max_test_rows": 200,
           "reference_size": 200, "seed": 0}


def _program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        need(name, "apt-get install -y prometheus prometheus-node-exporter (Debian 12: prometheus 2.42 with promtool)")
    return path


def _promtool(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([_program("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_checks_the_config_and_rules_and_the_rules_unit_tests_pass(tmp_path):
    for f in ("prometheus.yml", "alerts.yml", "alerts.test.yml"):
        shutil.copy(PROM / f, tmp_path / f)
    cfg = _promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert cfg.returncode == 0 and "SUCCESS" in cfg.stdout, cfg.stdout + cfg.stderr
    rules = _promtool("check", "rules", "alerts.yml", cwd=tmp_path)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    n = int(re.search(r"SUCCESS: (\d+) rules found", rules.stdout)[1])
    unit = _promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr
    print(f"\npromtool: config ok, {n} rules ok, rule unit tests ok")

    alerts = yaml.safe_load((PROM / "alerts.yml").read_text())
    rules = {r["alert"]: r for g in alerts["groups"] for r in g["rules"]}
    assert {"ServiceDown", "HighErrorRate", "PredictionLogSpillGrowing", "PredictionLogDatabaseDown", "DriftAlert", "MonitorStale",
            "HostDiskFull"} <= set(rules), sorted(rules)
    for name, r in rules.items():
        assert r["labels"]["severity"] in ("critical", "warning"), name
        assert r["annotations"]["summary"] and r["annotations"]["description"], name
    tested = {t["alertname"] for case in yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"] for t in case["alert_rule_test"]}
    assert {"ServiceDown", "DriftAlert"} <= tested, tested

    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["alerts.yml"] and prom["global"]["scrape_interval"] == "15s"
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert set(jobs) == JOBS, sorted(jobs)
    assert jobs["cvops_service"]["dns_sd_configs"] == [{"names": ["dl_service"], "type": "A", "port": 8000, "refresh_interval": "30s"}]
    assert [c["targets"] for c in jobs["cvops_monitor"]["static_configs"]] == [["monitor:9102"]]
    assert [c["targets"] for c in jobs["node"]["static_configs"]] == [["node-exporter:9100"]]


def _dashboard_queries() -> list:
    "(panel title, expr) of every query of every panel of the dashboard."
    dash = json.loads((GRAFANA / "dashboards" / "cvops.json").read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_grafana_dashboard_parses_every_panel_queries_the_provisioned_prometheus():
    dash = json.loads((GRAFANA / "dashboards" / "cvops.json").read_text())
    assert dash["uid"] == "cvops" and dash["schemaVersion"] >= 39 and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), ids
    for p in dash["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}, p["title"]
        assert p["targets"] and all(t["expr"].strip() and t["datasource"]["uid"] == "prometheus" for t in p["targets"]), p["title"]
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
    exprs = " ".join(e for _, e in _dashboard_queries())
    for metric in ("cvops_http_requests_total", "cvops_http_request_duration_seconds_bucket", "cvops_model_serving",
                   "cvops_prediction_log_queue_depth", "cvops_prediction_log_rows_on_disk", "cvops_prediction_log_database_up",
                   "cvops_drift_p_value", "cvops_drift_alert", "cvops_live_accuracy", "node_cpu_seconds_total",
                   "node_memory_MemAvailable_bytes", "node_filesystem_avail_bytes"):
        assert metric in exprs, metric
    assert set(re.findall(r"\$\w+", exprs)) <= set(GRAFANA_VARS), "a dashboard variable the end-to-end test does not fill in"
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [(d["uid"], d["type"], d["url"]) for d in ds] == [("prometheus", "prometheus", "http://prometheus:9090")]
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "cvops.yml").read_text())["providers"]
    assert [p["options"]["path"] for p in prov] == ["/var/lib/grafana/dashboards"]
    print(f"\n{len(dash['panels'])} panels, {len(_dashboard_queries())} queries:")
    for title, expr in _dashboard_queries():
        print(f"  {title}: {expr}")


# ---------------------------------------------------------------------------------------------------------------------
# end to end


@pytest.fixture
def processes(tmp_path):
    "start(name, argv, env=None, cwd=None): a process in its own group, its output in tmp_path/<name>.log; all stopped at the end."
    started = []

    def start(name, argv, env=None, cwd=None):
        log = open(tmp_path / f"{name}.log", "w")
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        proc.log_path = tmp_path / f"{name}.log"
        started.append((proc, log))
        return proc

    yield start
    for proc, log in reversed(started):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try: proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL); proc.wait(10)
        log.close()


def _wait(what: str, check, timeout: float, proc=None, interval: float = 0.5):
    "Until `check()` is truthy (returns it); AssertionError after `timeout` s, or when `proc` exits (with its log)."
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited {proc.returncode}\n{proc.log_path.read_text()[-4000:]}")
        try:
            out = check()
            if out: return out
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(interval)
    tail = proc.log_path.read_text()[-4000:] if proc is not None else ""
    raise AssertionError(f"{what}: not within {timeout} s\n{tail}")


def derived_prometheus_config(dest: Path, targets: dict) -> Path:
    """services/prometheus/prometheus.yml and its rules, for processes on this machine: each job's targets replaced by
    `targets[job]` (static; the replicas' DNS lookup too), a 1 s scrape and evaluation interval. Everything else stays."""
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    for job in cfg["scrape_configs"]:
        for key in ("dns_sd_configs", "static_configs", "scrape_interval", "scrape_timeout"):
            job.pop(key, None)
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    dest.mkdir(parents=True, exist_ok=True)
    for rules in cfg["rule_files"]:
        shutil.copy(PROM / rules, dest / rules)
    (dest / "prometheus.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest / "prometheus.yml"


def _query(prom_url: str, expr: str) -> list:
    r = requests.get(f"{prom_url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {r.status_code} {r.text[:500]}"
    return body["data"]["result"]


def test_metric_selectors_are_found():
    assert metric_selectors('sum by (instance) (rate(cvops_http_requests_total{route!~"/metrics|/health",status=~"5.."}[5m])) / up{job="x"}') == \
        ['cvops_http_requests_total{route!~"/metrics|/health",status=~"5.."}', 'up{job="x"}']
    assert metric_selectors('time() - (max by (instance) (cvops_monitor_last_run_timestamp_seconds) or process_start_time_seconds{job="cvops_monitor"})') == \
        ["cvops_monitor_last_run_timestamp_seconds", 'process_start_time_seconds{job="cvops_monitor"}']


def _traffic(svc: Service, v) -> int:
    "Nothing deployed yet (503s), then `v` deployed over HTTP, predictions with feedback, and bad uploads (4xx). Returns the predictions."
    images, labels, classes = v.trained.images, v.trained.labels, v.trained.classes
    for i in range(3):
        assert svc.predict(encode(images[i]), heatmap=False).status_code == 503
    r = svc.deploy(v.trained.name, v.version)
    assert r.status_code == 200, r.text
    svc.wait_workers_ready(v.version)
    n = MONITOR["window_rows"]
    for i in range(n):
        r = svc.predict(encode(images[i]), heatmap=False)
        assert r.status_code == 200, r.text
        if i % 2 == 0:
            f = requests.post(svc.url("/feedback"), json={"request_id": r.json()["request_id"], "labels": [classes[labels[i]]]}, timeout=30)
            assert f.status_code == 200, f.text
    bad = [svc.predict(b"not an image", "x.png", "image/png"), svc.predict(b"%PDF-1.4", "x.pdf", "application/pdf")]
    assert all(400 <= b.status_code < 500 for b in bad), [(b.status_code, b.text) for b in bad]
    return n


def _dead_worker_is_cleaned_up(svc: Service, version: str):
    "SIGKILL a worker: gunicorn's child_exit removes its live gauges' files; its counters stay counted; /metrics shows live workers only."
    prom_dir = svc.root / "var" / "prometheus"
    total = lambda text: sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("cvops_http_requests_total{"))
    before = total(requests.get(svc.url("/metrics"), timeout=10).text)
    victim = svc.worker_pids()[0]
    _wait(f"worker {victim}'s live gauge files", lambda: list(prom_dir.glob(f"gauge_live*_{victim}.db")), 30)
    os.kill(victim, signal.SIGKILL)
    _wait(f"gunicorn replaces worker {victim}", lambda: victim not in svc.worker_pids() and len(svc.worker_pids()) == svc.workers, 60)
    assert not list(prom_dir.glob(f"gauge_live*_{victim}.db")), sorted(p.name for p in prom_dir.iterdir())
    assert (prom_dir / f"counter_{victim}.db").exists()                       # its requests still count
    text = requests.get(svc.url("/metrics"), timeout=10).text
    assert total(text) >= before, (before, total(text))
    assert f'cvops_model_serving{{version="{version}"}} 1.0' in text, [l for l in text.splitlines() if "serving{" in l]
    return victim


def test_prometheus_finds_series_for_every_dashboard_query_and_alert_rule(tmp_path, processes):
    prometheus, node_exporter = _program("prometheus"), _program("prometheus-node-exporter")
    _program("promtool")
    from cvops.settings import default_db_url
    t0 = time.time()
    root = monitor_project(tmp_path / "project", MONITOR)
    v = tiny_version(root / "central_storage", work=tmp_path / "build")
    svc = Service(root, workers=2)
    try:
        svc.start()
        n = _traffic(svc, v)
        wait_predictions_logged(default_db_url(root), n)
        t_service = time.time() - t0

        node_port, mon_port, prom_port = free_port(), free_port(), free_port()
        node = processes("node-exporter", [node_exporter, f"--web.listen-address=127.0.0.1:{node_port}", "--collector.disable-defaults",
                                           "--collector.cpu", "--collector.meminfo", "--collector.filesystem",
                                           f"--collector.filesystem.fs-types-exclude={FS_TYPES_EXCLUDE}"])
        env = {**monitor_env(root, ""), "MONITOR_METRICS_HOST": "127.0.0.1", "MONITOR_METRICS_PORT": str(mon_port)}
        monitor = processes("monitor", [str(BIN / "cvops"), "monitor", "--every", "1h"], env=env, cwd=root)
        cfg = derived_prometheus_config(tmp_path / "prometheus", {
            "cvops_service": [f"127.0.0.1:{svc.port}"], "cvops_monitor": [f"127.0.0.1:{mon_port}"],
            "node": [f"127.0.0.1:{node_port}"], "prometheus": [f"127.0.0.1:{prom_port}"]})
        prom = processes("prometheus", [prometheus, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                        f"--web.listen-address=127.0.0.1:{prom_port}"])
        prom_url = f"http://127.0.0.1:{prom_port}"
        _wait("node-exporter answers", lambda: "node_cpu_seconds_total" in requests.get(f"http://127.0.0.1:{node_port}/metrics", timeout=5).text, 30, node)
        _wait("Prometheus is ready", lambda: requests.get(f"{prom_url}/-/ready", timeout=5).status_code == 200, 60, prom)

        # one monitoring run, its metrics served
        def after_a_run():
            text = requests.get(f"http://127.0.0.1:{mon_port}/metrics", timeout=5).text
            return text if "cvops_monitor_last_run_timestamp_seconds" in text else None
        mon_text = _wait("the monitor's first run", after_a_run, 240, monitor)
        assert 'cvops_monitor_runs_total{outcome="error"} 0.0' in mon_text, monitor.log_path.read_text()[-4000:]
        assert 'cvops_drift_p_value{features="all",test="run_alert"}' in mon_text, mon_text       # a run with drift test rows
        assert "cvops_live_accuracy " in mon_text and "cvops_monitor_interval_seconds 3600.0" in mon_text, mon_text
        t_monitor = time.time() - t0

        # every target up, then every dashboard query and every alert rule's selectors return series
        def all_up():
            active = requests.get(f"{prom_url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            return {t["labels"]["job"] for t in active if t["health"] == "up"} == JOBS
        _wait("every target up", all_up, 60, prom)
        dash = _dashboard_queries()
        exprs = [(title, expr, _fill(expr)) for title, expr in dash]
        rules = requests.get(f"{prom_url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        selectors = [(r["name"], s) for g in rules for r in g["rules"] for s in metric_selectors(r["query"])]

        def counts():
            got = {q: len(_query(prom_url, q)) for q in [e for _, _, e in exprs] + [s for _, s in selectors]}
            return got if all(got.values()) else None
        try:
            got = _wait("a series for every query", counts, 60, prom, interval=1)
        except AssertionError:
            got = {q: len(_query(prom_url, q)) for q in [e for _, _, e in exprs] + [s for _, s in selectors]}
            raise AssertionError("queries without series: " + "; ".join(q for q, c in got.items() if not c)) from None
        print(f"\nservice up with traffic after {t_service:.0f} s, monitor run after {t_monitor:.0f} s")
        print("dashboard queries (series):")
        for title, _, q in exprs: print(f"  {got[q]:>3}  {title}: {q}")
        print("alert rule selectors (series):")
        for name, s in selectors: print(f"  {got[s]:>3}  {name}: {s}")

        alerts = yaml.safe_load((PROM / "alerts.yml").read_text())
        assert {g["name"] for g in rules} == {g["name"] for g in alerts["groups"]}
        assert sorted(r["name"] for g in rules for r in g["rules"]) == sorted(r["alert"] for g in alerts["groups"] for r in g["rules"])
        assert all(r["health"] != "err" for g in rules for r in g["rules"]), [(r["name"], r.get("lastError")) for g in rules for r in g["rules"]]
        assert all(metric_selectors(r["query"]) for g in rules for r in g["rules"])
        serving = _query(prom_url, "max by (instance, version) (cvops_model_serving) == 1")
        assert [s["metric"]["version"] for s in serving] == [v.version], serving

        victim = _dead_worker_is_cleaned_up(svc, v.version)
        print(f"worker {victim} SIGKILLed: its live gauges removed, its counters kept; total {time.time() - t0:.0f} s")
    finally:
        svc.stop()


def _fill(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr
