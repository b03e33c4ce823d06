"""The dashboards' database reads are bounded in SQL by what the pages show (docs/monitoring.md): over a prediction log
holding many more rows outside the pages' periods and monitoring window than inside, every statement that
`drift_monitor_data` and `service_activity_data` execute returns only rows the page shows (each statement is captured
as SQLAlchemy sends it and run again to count what it returns); `rollout_data` reads the running rollout's rows, not an
earlier rollout's; and the dashboard notebooks read the database through these functions only."""
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from cvops.monitoring import dashboard_data as db
from cvops.predlog.schema import api_log, drift_reports, make_engine, migrate, predictions, shadow_predictions

REPO = Path(__file__).resolve().parents[1]
NOW = datetime.now(timezone.utc)
LOG_TABLES = re.compile(r"\bFROM (predictions|api_log|drift_reports|feedback|shadow_predictions)\b", re.I)


def dashboard_code(name: str) -> str:
    cells = json.loads((REPO / "notebooks" / "dashboards" / f"{name}.ipynb").read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def dashboard_days(name: str) -> float:
    "The period a dashboard shows, as its notebook sets it (`DAYS = 30`)."
    return float(re.search(r"^DAYS = (\d+)", dashboard_code(name), re.M).group(1))


def prediction(i: int, version: str, age: timedelta) -> dict:
    return dict(request_id=f"{version[:3]}{i:07d}", created_on=NOW - age, model_name=version.split("@")[0], model_version=version,
                top_class="ab"[i % 2], probabilities={}, features=None, feature_blob=None, feature_dims=None)


def request(i: int, age: timedelta) -> dict:
    return dict(request_id=f"q{i:07d}", created_on=NOW - age, method="POST", route="/predict", path="/predict", status_code=200,
                latency_ms=5.0, client="127.0.0.1", model_version="m@1", error=None)


def run_rows(run: str, age: timedelta, n_rows: int) -> list:
    "A monitoring run's drift-report rows (run_alert, a test, live accuracy) over the last hour before it."
    t = NOW - age
    base = dict(run_id=run, created_on=t, model_name="m", model_version="m@1", window_start=t - timedelta(hours=1), window_end=t,
                n_rows=n_rows, n_reference=100, statistic=0.1, p_value=0.5, threshold=0.05, verdict="no drift", backend="cvops",
                details={"window": {"window_days": 7, "window_rows": 1000}})
    return [dict(base, test=test, features=f) for test, f in (("run_alert", "all"), ("mmd_uae", "uae"), ("live_accuracy", "feedback"))]


@pytest.fixture
def log(tmp_path):
    """A prediction log: inside the pages' bounds 40 predictions of the serving version m@1 in the last hour (the latest run's
    window), 10 of another version, 30 requests, one run 30 minutes ago; outside them 3,000 old predictions of m@1 and 2,000
    of the other version, 3,000 old requests, 400 old runs; and version n@1 with 5,000 predictions of the last 2 days, no run."""
    engine = make_engine(f"sqlite:///{tmp_path}/cvops.db"); migrate(engine)
    with engine.begin() as c:
        c.execute(predictions.insert(), [prediction(i, "m@1", timedelta(minutes=50 - i)) for i in range(40)]
                  + [prediction(40 + i, "m@1", timedelta(days=60, seconds=i)) for i in range(3000)]
                  + [prediction(i, "other@1", timedelta(days=45, seconds=i)) for i in range(2000)]
                  + [prediction(2000 + i, "other@1", timedelta(hours=2, seconds=i)) for i in range(10)]
                  + [prediction(i, "n@1", timedelta(days=2) * i / 5000) for i in range(5000)])
        c.execute(api_log.insert(), [request(i, timedelta(hours=20, seconds=i)) for i in range(30)]
                  + [request(30 + i, timedelta(days=30, seconds=i)) for i in range(3000)])
        c.execute(drift_reports.insert(), run_rows("new", timedelta(minutes=10), 40)
                  + [r for k in range(400) for r in run_rows(f"old{k}", timedelta(days=90, minutes=k), 40)])
    (tmp_path / "pipeline.yaml").write_text("tasks: []\n")   # the project: no config, the monitor's default window (7 days, 1,000 rows)
    src = db.Sources(engine, tmp_path / "central_storage", tmp_path, f"sqlite:///{tmp_path}/cvops.db")
    yield src
    engine.dispose()


def counted_statements(engine, calls) -> list:
    "(statement, rows it returns) of every SELECT on the log's tables that `calls()` executes."
    seen = []
    def capture(conn, cursor, statement, parameters, context, executemany): seen.append((statement, parameters))
    sa.event.listen(engine, "before_cursor_execute", capture)
    try: calls()
    finally: sa.event.remove(engine, "before_cursor_execute", capture)
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        return [(s, len(cur.execute(s, p).fetchall())) for s, p in seen if s.lstrip().upper().startswith("SELECT") and LOG_TABLES.search(s)]
    finally: raw.close()


def test_every_dashboard_query_returns_only_what_the_page_shows(log):
    serving = db.Serving({"model_name": "m", "version": "m@1"}, None, {})
    days_drift, days_service = dashboard_days("drift_monitor"), dashboard_days("service_activity")
    assert days_drift < 45 and days_service < 30   # the old rows above are outside the pages' periods
    out = {}
    stmts = counted_statements(log.engine, lambda: out.update(drift=db.drift_monitor_data(log, serving, days_drift, NOW),
                                                               service=db.service_activity_data(log, days_service, NOW)))
    d = out["drift"]
    assert list(d.history.run_id.unique()) == ["new"] and "latest drift run" in d.window_from
    assert len(d.window) == 40 and set(d.window.model_version) == {"m@1"}
    assert len(d.counts) == 40 + 10 + 5000 and len(out["service"]) == 30
    assert len(stmts) >= 4, stmts                                  # drift reports, the window, the counts, the requests
    shown = {"drift_reports": 3, "api_log": 30, "predictions": 5050}   # the most rows of each table the pages show
    over = [(s, n) for s, n in stmts if n > shown[LOG_TABLES.search(s).group(1).lower()]]
    assert not over, f"statements reading past what the pages show: {over}"
    window = [(s, n) for s, n in stmts if "LIMIT" in s.upper() and "predictions" in s]
    assert window and all(n == 40 for _, n in window), window     # the window: the run's 40 rows, not the version's 3,040


def test_without_a_run_the_window_is_the_configs_row_limit_in_sql(log):
    serving = db.Serving({"model_name": "n", "version": "n@1"}, None, {})
    out = {}
    stmts = counted_statements(log.engine, lambda: out.update(drift=db.drift_monitor_data(log, serving, 30, NOW)))
    assert "no drift run yet" in out["drift"].window_from and len(out["drift"].window) == 1000
    window = [n for s, n in stmts if "LIMIT" in s.upper() and "predictions" in s]
    assert window == [1000], stmts                                 # 5,000 rows in the 7 days, 1,000 read


def test_the_rollout_page_reads_the_running_rollout_only(log):
    "A candidate m@2 in shadow since an hour: 40 shadowed requests since, 2,000 of an earlier rollout of it 60 days ago."
    started = NOW - timedelta(hours=1)
    def shadow(i: int, age: timedelta) -> dict:
        return dict(request_id=f"m@1{i:07d}", created_on=NOW - age, role="shadow", model_name="m", model_version="m@2",
                    top_class="ab"[(i // 5) % 2], probabilities={}, latency_ms=1.0, error=None)
    with log.engine.begin() as c:
        c.execute(shadow_predictions.insert(), [shadow(i, timedelta(minutes=50 - i)) for i in range(40)]
                  + [shadow(40 + i, timedelta(days=60, seconds=i)) for i in range(2000)])
    (log.storage / "deployments").mkdir(parents=True)
    (log.storage / "deployments" / "candidate.json").write_text(json.dumps(
        {"model_name": "m", "version": "m@2", "mode": "shadow", "fraction": 0.5, "started_at": started.isoformat(), "serving_version": "m@1"}))
    out = {}
    stmts = counted_statements(log.engine, lambda: out.update(r=db.rollout_data(log, pairs=2, per_pair=3)))
    cmp = out["r"].comparison
    assert cmp["n_pairs"] == 40 and cmp["agreement"] == 0.6, cmp     # the served class alternates every request, the candidate's every 5: 3 of 5 agree
    assert len(out["r"].examples) == 6 and out["r"].examples.image_path.isna().all()
    over = [(s, n) for s, n in stmts if n > 40]
    assert len(stmts) >= 3 and not over, (stmts, over)               # the pairs, the 5xx counts, the examples: not the earlier rollout


def test_the_dashboards_read_the_database_through_these_functions_only():
    for name, reader in (("drift_monitor", "db.drift_monitor_data("), ("service_activity", "db.service_activity_data("),
                         ("rollout", "db.rollout_data(")):
        code = dashboard_code(name)
        assert reader in code, name
        assert "src.engine" not in code and "predlog" not in code and "sqlalchemy" not in code, name
