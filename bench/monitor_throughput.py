"""Monitoring-run throughput: read a window of 100,000 logged predictions and run the drift tests.

100,000 prediction rows (api_log + predictions, each with realistic detector features: `uae` 32 floats,
`bbsd` 10 softmax probabilities, as the service logs them: float32 `feature_blob` + `feature_dims`) are written through
cvops.predlog.writer.PredictionLog into a SQLite database in a temp folder (their created_on spread over the last 6 days),
and the same features again as rows of releases before migration 0003 (6-decimal JSON `features`), another version. Then, per round, timed:

  read   the window from the public tables (SELECT created_on, top_class, features FROM predictions of the version,
         newest first, within monitor.window_days, LIMIT window_rows): the SQL fetch, the JSON parse of the features,
         the arrays/frame (as cvops.monitoring.drift_detectors.feature_frame makes it)
  tests  cvops.monitoring.drift.run_drift_tests against a 1,000-row reference: KS (Bonferroni) on BBSD and chi-square on the
         predicted class over every row of the window; MMD (permutation test, monitor.permutations) and the
         classifier two-sample test on a monitor.max_test_rows = 1,000-row subsample

for two windows: all 100,000 rows (window_rows: null) and the default config's latest 1,000. When cvops.monitoring.check_drift
(read_window + window_frame) is importable, its reader is timed on the same database too. Target: the 100,000-row
run (read + tests) < 15 s on 2 cores. Medians over --rounds; results to --out (JSON) and a table on stdout.

    python bench/monitor_throughput.py [--rows 100000] [--rounds 3] [--out bench/results/monitor_throughput.json]
"""
import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VERSION = "fashion_mnist_cnn@20260101T000000Z"          # rows as the service logs them: float32 feature_blob + feature_dims
VERSION_JSON = "fashion_mnist_cnn@20250101T000000Z"     # the same features as rows of releases before migration 0003 (JSON)
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
TARGET_S = 15.0


def fake_features(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    "UAE-like (32 correlated floats) and BBSD-like (peaked softmax over 10 classes) features."
    mix = rng.normal(size=(32, 32)) / 6
    uae = rng.normal(size=(n, 32)) @ mix + rng.normal(0, 0.2, 32)
    logits = rng.normal(0, 1, (n, 10)); logits[np.arange(n), rng.integers(0, 10, n)] += rng.uniform(2, 9, n)
    p = np.exp(logits - logits.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    return uae.astype(np.float32), p.astype(np.float32)


def write_rows(url: str, n: int, rng, spill: Path, version: str = VERSION, blob: bool = True) -> dict:
    from cvops.predlog.writer import PredictionLog
    from cvops.predlog.schema import make_engine, migrate, pack_features
    eng = make_engine(url); migrate(eng)
    uae, bbsd = fake_features(n, rng)
    now = datetime.now(timezone.utc); span = timedelta(days=6).total_seconds()
    offsets = np.sort(rng.uniform(0, span, n))[::-1]
    plog = PredictionLog(eng, spill, None, batch_size=2000)
    for i in range(n):
        rid = uuid.uuid4().hex; t = now - timedelta(seconds=float(offsets[i]))
        probs = [round(float(v), 6) for v in bbsd[i]]
        api = {"request_id": rid, "created_on": t, "method": "POST", "route": "/predict", "path": "/predict", "status_code": 200,
               "latency_ms": 12.0, "client": "127.0.0.1", "model_version": version, "error": None}
        pred = {"request_id": rid, "created_on": t, "model_name": "fashion_mnist_cnn", "model_version": version,
                "top_class": CLASSES[int(bbsd[i].argmax())], "probabilities": dict(zip(CLASSES, probs)), "latency_ms": 12.0,
                **(pack_features({"bbsd": bbsd[i], "uae": uae[i]}) if blob else
                   {"features": {"uae": [round(float(v), 6) for v in uae[i]], "bbsd": probs}})}
        plog.log(api, pred)
    t0 = time.perf_counter(); plog.start()
    while plog.written < n and time.perf_counter() - t0 < 600: time.sleep(0.01)
    dt = time.perf_counter() - t0; plog.stop()
    return {"rows": plog.written, "seconds": round(dt, 2), "rows_s": round(plog.written / dt)}


def read_window(eng, window_days, window_rows) -> tuple:
    "The bench's own reader on the public tables: (frame, timings)."
    import sqlalchemy as sa
    from cvops.monitoring.drift_detectors import feature_frame
    from cvops.predlog.schema import predictions as p
    try:
        import orjson; loads = orjson.loads
    except ImportError: loads = json.loads
    t0 = time.perf_counter()
    q = (sa.select(p.c.created_on, p.c.top_class, sa.cast(p.c.features, sa.Text)).where(p.c.model_version == VERSION_JSON)
         .order_by(p.c.created_on.desc()))
    if window_days: q = q.where(p.c.created_on >= datetime.now(timezone.utc) - timedelta(days=window_days))
    if window_rows: q = q.limit(window_rows)
    with eng.connect() as c: rows = c.execute(q).all()
    t1 = time.perf_counter()
    parsed = loads("[" + ",".join(r[2] for r in rows) + "]")
    t2 = time.perf_counter()
    feats = {k: np.array([d[k] for d in parsed], np.float32) for k in ("uae", "bbsd")}
    df = feature_frame(feats); df["predicted"] = [r[1] for r in rows]
    t3 = time.perf_counter()
    return df, {"sql_fetch": t1 - t0, "json_parse": t2 - t1, "frame": t3 - t2, "read_total": t3 - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--config", default=str(ROOT / "configs/config.yaml"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/monitor_throughput.json"))
    a = ap.parse_args()
    from cvops.config import load_config
    from cvops.monitoring.drift_detectors import feature_frame
    from cvops.monitoring.drift import run_drift_tests
    from cvops.predlog.schema import make_engine
    mon = load_config(a.config).monitor
    rng = np.random.default_rng(0)
    ru, rb = fake_features(mon.reference_size, np.random.default_rng(1))
    ref = feature_frame({"uae": ru, "bbsd": rb}, classes=CLASSES)
    try:
        from cvops.monitoring.check_drift import window_frame
        from cvops.predlog.queries import read_window as monitor_read_window   # not this file's read_window (the JSON-era reader)
        h7_reader = (monitor_read_window, window_frame)
    except Exception as e:  # noqa: BLE001  (the monitor module is optional here)
        h7_reader = None; print(f"cvops.monitoring.check_drift reader not timed: {type(e).__name__}: {e}")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        print(f"writing {a.rows} prediction rows through cvops.predlog.writer ...", flush=True)
        written = write_rows(url, a.rows, rng, Path(tmp) / "spill")
        print(f"  {written}", flush=True)
        print(f"writing the same {a.rows} rows as older releases logged them (JSON features) ...", flush=True)
        written_json = write_rows(url, a.rows, np.random.default_rng(0), Path(tmp) / "spill-json", VERSION_JSON, blob=False)
        print(f"  {written_json}", flush=True)
        eng = make_engine(url)
        windows = {"all_rows": (mon.window_days, None), "default_window": (mon.window_days, mon.window_rows)}
        runs = {w: [] for w in windows}
        for rnd in range(a.rounds):
            for w, (days, nrows) in windows.items():
                t0 = time.perf_counter()
                cur, tr = read_window(eng, days, nrows)
                t1 = time.perf_counter()
                recs = run_drift_tests(ref, cur, CLASSES, mon, seed=rnd)
                t2 = time.perf_counter()
                rec = {**tr, "tests_total": t2 - t1, "total": t2 - t0, "n_rows": len(cur),
                       **{f"test_{r['test']}": r["details"].get("seconds") for r in recs},
                       "verdicts": {r["test"]: r["verdict"] for r in recs}}
                if h7_reader:   # the monitor's reader: float32 blob rows (as logged now), then the same rows as JSON
                    t3 = time.perf_counter(); rows = h7_reader[0](eng, VERSION, days, nrows); t4 = time.perf_counter()
                    frame = h7_reader[1](rows); t5 = time.perf_counter()
                    rec.update(cvops_monitor_read=t5 - t3, cvops_monitor_sql=t4 - t3, cvops_monitor_frame=t5 - t4, cvops_monitor_rows=len(frame))
                    t3 = time.perf_counter(); rows = h7_reader[0](eng, VERSION_JSON, days, nrows); t4 = time.perf_counter()
                    h7_reader[1](rows); t5 = time.perf_counter()
                    rec.update(cvops_monitor_read_json=t5 - t3, cvops_monitor_sql_json=t4 - t3, cvops_monitor_frame_json=t5 - t4)
                runs[w].append(rec)
                print(f"  round {rnd} {w}: {len(cur)} rows, read {tr['read_total']:.2f} s (sql {tr['sql_fetch']:.2f}, json {tr['json_parse']:.2f}, "
                      f"frame {tr['frame']:.2f}), tests {t2 - t1:.2f} s, total {t2 - t0:.2f} s"
                      + (f"; cvops.monitoring.check_drift reader: float32 blobs {rec['cvops_monitor_read']:.2f} s (sql {rec['cvops_monitor_sql']:.2f}, "
                         f"frame {rec['cvops_monitor_frame']:.2f}), JSON rows {rec['cvops_monitor_read_json']:.2f} s (sql "
                         f"{rec['cvops_monitor_sql_json']:.2f}, frame {rec['cvops_monitor_frame_json']:.2f})" if h7_reader else ""), flush=True)
    med = {w: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0] if isinstance(rs[0][k], (int, float)) and rs[0][k] is not None}
           for w, rs in runs.items()}
    result = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]},
              "rows_logged": written, "rows_logged_json": written_json, "monitor": {k: getattr(mon, k) for k in ("window_days", "window_rows", "permutations", "max_test_rows", "backend")},
              "median_seconds": med, "rounds": runs, "target_s": TARGET_S,
              "met": med["all_rows"]["total"] < TARGET_S}
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True); out.write_text(json.dumps(result, indent=1, default=float))
    print(f"\n{'window':16} {'rows':>7} {'sql':>6} {'json':>6} {'frame':>6} {'tests':>6} {'total':>6}")
    for w, m in med.items():
        print(f"{w:16} {int(m['n_rows']):7d} {m['sql_fetch']:6.2f} {m['json_parse']:6.2f} {m['frame']:6.2f} {m['tests_total']:6.2f} {m['total']:6.2f}")
    if "cvops_monitor_read" in med["all_rows"]:
        for w, m in med.items():
            print(f"cvops.monitoring.check_drift reader, {w}: float32 blob rows {m['cvops_monitor_read']:.2f} s, JSON rows {m['cvops_monitor_read_json']:.2f} s")
    print(f"target: all {a.rows} rows < {TARGET_S} s -> {'met' if result['met'] else 'MISSED'}; wrote {out}")


if __name__ == "__main__":
    main()
