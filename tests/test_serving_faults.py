"""The prediction service when its database goes away: a throw-away PostgreSQL cluster (Debian's
initdb + pg_ctl on a free port, never the machine's own) is stopped under load and started again.
Predictions keep succeeding, /ready and /metrics tell the truth, and afterwards every successful
prediction has exactly one row in the database (from memory, or written back from spill files)."""
import time

import pytest
import requests
import sqlalchemy as sa

from cvops.testing import PredictionLoad, encode

pytestmark = pytest.mark.service

WARMUP_S, OUTAGE_S, RECOVERY_S = 3.0, 5.0, 6.0
N_THREADS = 3


def _counts(url) -> dict:
    from cvops.predlog.schema import api_log, predictions
    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            n = {t.name: c.execute(sa.select(sa.func.count()).select_from(t)).scalar() for t in (api_log, predictions)}
            n["api_predict"] = c.execute(sa.select(sa.func.count()).select_from(api_log).where(api_log.c.route == "/predict")).scalar()
            n["distinct"] = c.execute(sa.select(sa.func.count(sa.distinct(predictions.c.request_id)))).scalar()
    finally:
        eng.dispose()
    return n


def _metric(text: str, name: str) -> float:
    "The sum of a metric's samples (over workers, labels) in Prometheus text format."
    from prometheus_client.parser import text_string_to_metric_families
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def _spill_files(root) -> list:
    d = root / "var" / "spill"
    return sorted(p.name for p in d.glob("spill-*.jsonl*")) if d.exists() else []


def _outage(pg, svc, root, images, *, expect_spill: bool):
    "Load, stop the database for OUTAGE_S, start it, load on; returns what was observed."
    seen = {"ready_down": [], "ready_after": None, "queue_max": 0.0, "spilled_max": 0.0, "db_up_min": 1.0,
            "spill_files_max": 0, "spill_files_left_under_load": None}
    with PredictionLoad(svc, images, n=N_THREADS, heatmap="alternate") as load:
        time.sleep(WARMUP_S)
        pg.stop("fast")
        t_down = time.monotonic()
        try:
            while time.monotonic() - t_down < OUTAGE_S:
                r = requests.get(svc.url("/ready"), timeout=10)
                seen["ready_down"].append((r.status_code, r.json()))
                m = requests.get(svc.url("/metrics"), timeout=10).text
                seen["queue_max"] = max(seen["queue_max"], _metric(m, "cvops_prediction_log_queue_depth"))
                seen["spilled_max"] = max(seen["spilled_max"], _metric(m, "cvops_prediction_log_rows_spilled_total"))
                seen["db_up_min"] = min(seen["db_up_min"], _metric(m, "cvops_prediction_log_database_up"))
                seen["spill_files_max"] = max(seen["spill_files_max"], len(_spill_files(root)))
                time.sleep(0.3)
        finally:
            pg.start()
        t_up = time.monotonic()
        # ready again (every worker: several requests), while the load goes on
        deadline = t_up + RECOVERY_S + 10
        while time.monotonic() < deadline:
            rs = [requests.get(svc.url("/ready"), timeout=10) for _ in range(6)]
            if all(r.status_code == 200 for r in rs):
                seen["ready_after"] = time.monotonic() - t_up; break
            time.sleep(0.3)
        remaining = RECOVERY_S - (time.monotonic() - t_up)
        if remaining > 0: time.sleep(remaining)
        if expect_spill: seen["spill_files_left_under_load"] = _spill_files(root)
    seen.update(results=load.results, t_down=t_down, t_up=t_up)
    return seen


def _wait_caught_up(url, n_ok, root, timeout=45) -> dict:
    "Poll the database until the writers have written every row (and no spill file is left)."
    deadline, counts = time.time() + timeout, None
    while time.time() < deadline:
        try: counts = _counts(url)
        except sa.exc.OperationalError: counts = None
        if counts and counts["predictions"] >= n_ok and not _spill_files(root): break
        time.sleep(0.5)
    return counts


def _check(seen, counts, svc):
    results = seen["results"]
    ok = [r for r in results if r.status == 200]
    bad = [r for r in results if r.status != 200]
    during = [r for r in results if seen["t_down"] <= r.started <= seen["t_up"]]
    print(f"{len(results)} predictions ({len(during)} during the outage), /ready after restart in {seen['ready_after']} s, "
          f"max queue {seen['queue_max']:.0f}, spilled {seen['spilled_max']:.0f} rows in up to {seen['spill_files_max']} files, counts {counts}")
    assert not bad, f"{len(bad)} of {len(results)} predictions failed, e.g. {bad[:3]}\n{svc.read_log()}"
    assert len(during) >= 20 and all(r.status == 200 for r in during), f"{len(during)} predictions during the outage"
    assert len({r.request_id for r in ok}) == len(ok)
    # /ready: the database is reported unreachable during the outage, and ready again after
    assert seen["ready_down"], "no /ready answer during the outage"
    down = [(c, b) for c, b in seen["ready_down"] if c == 503 and b["database"] == "unreachable" and not b["ready"]]
    assert down, f"/ready never said the database was unreachable: {seen['ready_down'][:5]}"
    assert seen["ready_after"] is not None, "/ready did not recover after the database came back"
    # /metrics: rows waited in memory or on disk, and the writer saw the database down
    assert seen["queue_max"] > 0 or seen["spilled_max"] > 0, seen
    assert seen["db_up_min"] == 0, seen
    # exactly one row per successful prediction
    assert counts is not None, "could not count rows"
    assert counts["predictions"] == len(ok), (counts, len(ok))
    assert counts["distinct"] == counts["predictions"]
    assert counts["api_predict"] == len(ok), (counts, len(ok))
    assert counts["api_log"] >= counts["predictions"]
    return len(ok)


@pytest.fixture
def images(trained_models):
    _, xt, _, _ = trained_models["a"]
    return [encode(xt[i], "PNG") for i in range(50)]


def served_outage(pg, service_root, service_factory, images, env=None, expect_spill=False):
    "The service logging to `pg` (with `env`), under load through a database outage: (what was observed, the service)."
    root = service_root["root"]
    svc = service_factory(root, workers=2, db_url=pg.url, env=env)
    svc.wait_workers_ready(service_root["a"])
    return _outage(pg, svc, root, images, expect_spill=expect_spill), svc


def one_row_per_answer(pg, svc, seen):
    "Every 200 of the outage has exactly one row: once the writers caught up, and after the service stopped (shutdown flushes)."
    n_ok = len([r for r in seen["results"] if r.status == 200])
    counts = _wait_caught_up(pg.url, n_ok, svc.root)
    _check(seen, counts, svc)
    svc.stop()
    after = _counts(pg.url)
    assert after["predictions"] == n_ok and after["api_predict"] == n_ok, (after, n_ok)


def test_database_outage_under_load_loses_no_row(pg, service_root, service_factory, images):
    "The database stopped for 5 s under load: no failed prediction, and one row per 200 afterwards."
    seen, svc = served_outage(pg, service_root, service_factory, images)
    one_row_per_answer(pg, svc, seen)
    assert not _spill_files(svc.root)


def test_database_outage_spills_to_disk_and_writes_back(pg, service_root, service_factory, images):
    "Async mode with LOG_MAX_BUFFER=50: the outage spills rows to var/spill/*.jsonl; all are written back once it is over."
    seen, svc = served_outage(pg, service_root, service_factory, images, {"LOG_MAX_BUFFER": "50", "LOG_DURABILITY": "async"}, True)
    assert seen["spill_files_max"] > 0 and seen["spilled_max"] > 0, "nothing was spilled to disk during the outage"
    # the database came back while the load went on: the spill files were written back meanwhile
    assert seen["spill_files_left_under_load"] == [], f"spill files not written back under load: {seen['spill_files_left_under_load']}"
    one_row_per_answer(pg, svc, seen)
    assert not _spill_files(svc.root)
