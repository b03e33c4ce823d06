"""Monitoring-run throughput: one whole monitoring run (`cvops.monitoring.check_drift.check_drift`) over 100,000 logged predictions.

Set-up, in a temporary folder: a version published into a central storage and deployed (a placeholder model file; its classes
and test accuracy in the metadata; its reference data: `monitor.reference_size` rows of UAE-like (32 correlated floats) and
BBSD-like (10 softmax probabilities) features), and 100,000 prediction rows of that version written through
`cvops.predlog.writer.PredictionLog` into SQLite as the service logs them (float32 `feature_blob` + `feature_dims`, created_on
over the last 6 days), 1% of them with feedback. With --json-rows, the same rows again as rows of releases before migration
0003 (6-decimal JSON `features`) of another version, for the reader's figure on them.

Timed per round, for two windows: all 100,000 rows (`window_rows: null`) and the default config's (latest `window_rows`):
  run        `check_drift(...)`: what `cvops monitor` runs in its notebook: read the window, check the version and load its
             reference data, the drift tests (KS and chi-square over every row, MMD and the classifier test on a
             `monitor.max_test_rows` subsample, Holm), live accuracy over the rows with feedback, the drift-report rows written
  parts      the same steps called one by one: sql (`read_window`), frame (`window_frame`), reference (the parquet),
             tests (`window_tests`), write (`write_drift_reports`); `reader` = sql + frame (the monitor's reader)
  limit      the same rows' feature blobs in one SQL query (no join, no other column) + `np.frombuffer`: what reading the
             window cannot beat
One run before the rounds warms the process (scipy's and scikit-learn's imports), as a monitor that runs on a schedule is
warm; its time is reported as `first_run_s`. Medians over --rounds. Target: the 100,000-row run < 1 s on 2 cores.

    python bench/monitor_throughput.py [--rows 100000] [--rounds 5] [--json-rows] [--out bench/results/monitor_throughput.json]
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
from cvops.cpu import use_cpu_kernels  # noqa: E402

use_cpu_kernels()   # before numpy loads OpenBLAS, as the `cvops` command does
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "fashion_mnist_cnn"
VERSION_JSON = "fashion_mnist_cnn@20250101T000000Z"     # the same features as rows of releases before migration 0003 (JSON)
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
TARGET_S = 1.0


def fake_features(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    "UAE-like (32 correlated floats) and BBSD-like (peaked softmax over 10 classes) features."
    mix = rng.normal(size=(32, 32)) / 6
    uae = rng.normal(size=(n, 32)) @ mix + rng.normal(0, 0.2, 32)
    logits = rng.normal(0, 1, (n, 10)); logits[np.arange(n), rng.integers(0, 10, n)] += rng.uniform(2, 9, n)
    p = np.exp(logits - logits.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    return uae.astype(np.float32), p.astype(np.float32)


def publish_reference_version(storage: Path, work: Path, n_ref: int) -> str:
    "A deployed version of NAME whose reference data has `n_ref` rows (no model in it: the monitor never loads one)."
    from cvops.monitoring.drift_detectors import feature_frame
    from cvops.registry.versions import ref_data_path
    from cvops.testing import publish_version
    uae, bbsd = fake_features(n_ref, np.random.default_rng(1))
    ref = feature_frame({"uae": uae, "bbsd": bbsd}, classes=CLASSES)
    ref["label"] = ref["predicted"]
    model = work / "model"; model.mkdir(parents=True)
    (model / "README").write_text("a placeholder: the monitor reads the metadata and the reference data, never the model\n")
    ref_file = ref_data_path(work / "files", NAME); ref_file.parent.mkdir(parents=True)
    ref.to_parquet(ref_file)
    files = {ref_data_path(Path("."), NAME).as_posix(): ref_file}
    from cvops.registry.deploy import deploy
    version = publish_version(storage, model, NAME, 0.9, files, CLASSES, n_images=2000)
    deploy(storage, NAME, version, by="bench", loaded=True)   # no model to load: the monitor only reads the pointer and the files
    return version


def write_rows(url: str, n: int, rng, spill: Path, version: str, blob: bool = True, feedback: float = 0.01) -> dict:
    "`n` predictions of `version` through the service's writer, created over the last 6 days; `feedback` of them labelled."
    import sqlalchemy as sa
    from cvops.predlog.writer import PredictionLog
    from cvops.predlog.schema import feedback as fb, make_engine, migrate, pack_features
    eng = make_engine(url); migrate(eng)
    uae, bbsd = fake_features(n, rng)
    now = datetime.now(timezone.utc); span = timedelta(days=6).total_seconds()
    offsets = np.sort(rng.uniform(0, span, n))[::-1]
    plog = PredictionLog(eng, spill, None, batch_size=2000)
    labelled = []
    for i in range(n):
        rid = uuid.uuid4().hex; t = now - timedelta(seconds=float(offsets[i]))
        probs = [round(float(v), 6) for v in bbsd[i]]
        top = CLASSES[int(bbsd[i].argmax())]
        api = {"request_id": rid, "created_on": t, "method": "POST", "route": "/predict", "path": "/predict", "status_code": 200,
               "latency_ms": 12.0, "client": "127.0.0.1", "model_version": version, "error": None}
        pred = {"request_id": rid, "created_on": t, "model_name": NAME, "model_version": version,
                "top_class": top, "probabilities": dict(zip(CLASSES, probs)), "latency_ms": 12.0,
                **(pack_features({"bbsd": bbsd[i], "uae": uae[i]}) if blob else
                   {"features": {"uae": [round(float(v), 6) for v in uae[i]], "bbsd": probs}})}
        plog.log(api, pred)
        if rng.random() < feedback:
            labelled.append({"request_id": rid, "created_on": t, "labels": top if rng.random() < 0.9 else CLASSES[0], "source": "bench"})
    t0 = time.perf_counter(); plog.start()
    while plog.written < n and time.perf_counter() - t0 < 600: time.sleep(0.01)
    dt = time.perf_counter() - t0; plog.stop()
    if labelled:
        with eng.begin() as c: c.execute(fb.insert(), labelled)
    eng.dispose()
    return {"rows": plog.written, "seconds": round(dt, 2), "rows_s": round(plog.written / dt), "feedback": len(labelled)}


def raw_blobs(eng, version: str, since: datetime, limit) -> np.ndarray:
    "The limit: the window's feature blobs in one query, no join, no other column, straight into one float32 array."
    import sqlalchemy as sa
    from cvops.predlog.schema import predictions as p
    q = (sa.select(p.c.feature_blob).where(p.c.model_version == version, p.c.created_on >= since)
         .order_by(p.c.created_on.desc()).limit(limit))
    with eng.connect() as c: blobs = c.execute(q).scalars().all()
    return np.frombuffer(b"".join(blobs), "<f4").reshape(len(blobs), -1)


def parts(eng, storage: Path, version: str, mon, now: datetime) -> dict:
    "The steps of a monitoring run called one by one (what `check_drift` does), each timed."
    import pandas as pd
    from cvops.monitoring.check_drift import window_frame
    from cvops.monitoring.drift import window_tests
    from cvops.predlog.queries import read_window, write_drift_reports
    from cvops.registry.versions import ref_data_path, version_folder
    t = [time.perf_counter()]
    rows = read_window(eng, version, mon.window_days, mon.window_rows, now); t.append(time.perf_counter())
    cur = window_frame(rows); t.append(time.perf_counter())
    ref = pd.read_parquet(ref_data_path(version_folder(storage, version), NAME)); t.append(time.perf_counter())
    recs = window_tests(ref, cur, CLASSES, mon); t.append(time.perf_counter())
    write_drift_reports(eng, [{"run_id": f"parts-{uuid.uuid4().hex[:8]}", "created_on": now, "model_name": NAME, "model_version": version,
                               "n_rows": len(cur), "n_reference": len(ref), "test": r["test"], "features": r["features"],
                               "statistic": r["statistic"], "p_value": r["p_value"], "threshold": r["threshold"],
                               "verdict": r["verdict"], "backend": r["backend"], "details": {}} for r in recs]); t.append(time.perf_counter())
    d = np.diff(t)
    return {"sql": d[0], "frame": d[1], "reader": d[0] + d[1], "reference": d[2], "tests": d[3], "write": d[4], "parts_total": t[-1] - t[0],
            **{f"test_{r['test']}": r["details"].get("seconds") for r in recs if r["details"].get("seconds") is not None}}


def one_round(eng, storage: Path, version: str, mon, rnd: int) -> dict:
    from cvops.monitoring.check_drift import check_drift
    now = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    run = check_drift(storage.parent, mon, run_id=f"bench-{rnd}-{uuid.uuid4().hex[:6]}", engine=eng, storage=storage, now=now, notify=False)
    t1 = time.perf_counter()
    since = now - timedelta(days=mon.window_days) if mon.window_days else datetime.min.replace(tzinfo=timezone.utc)
    t2 = time.perf_counter(); x = raw_blobs(eng, version, since, mon.window_rows); t3 = time.perf_counter()
    assert len(x) == run.n_rows, (len(x), run.n_rows)
    return {"run": t1 - t0, "limit_read": t3 - t2, "n_rows": run.n_rows, **parts(eng, storage, version, mon, now),
            "verdicts": {r["test"]: r["verdict"] for r in run.rows}}


def json_reader(eng, mon, rounds: int) -> dict:
    "The monitor's reader on the JSON rows (median seconds over `rounds`)."
    from cvops.monitoring.check_drift import window_frame
    from cvops.predlog.queries import read_window
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter(); window_frame(read_window(eng, VERSION_JSON, mon.window_days, None)); ts.append(time.perf_counter() - t0)
    return {"reader_json_rows": round(statistics.median(ts), 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json-rows", action="store_true", help="also write the rows as JSON features and time the reader on them")
    ap.add_argument("--config", default=str(ROOT / "configs/config.yaml"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/monitor_throughput.json"))
    a = ap.parse_args()
    from cvops.config import load_config
    from cvops.predlog.schema import make_engine
    mon = load_config(a.config).monitor
    windows = {"all_rows": mon.model_copy(update={"window_rows": None}), "default_window": mon}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp); storage = tmp / "central_storage"
        version = publish_reference_version(storage, tmp / "version", mon.reference_size)
        url = f"sqlite:///{tmp}/bench.db"
        print(f"writing {a.rows} prediction rows of {version} through cvops.predlog.writer ...", flush=True)
        written = write_rows(url, a.rows, np.random.default_rng(0), tmp / "spill", version)
        print(f"  {written}", flush=True)
        if a.json_rows:
            print(f"writing the same {a.rows} rows as older releases logged them (JSON features) ...", flush=True)
            print(f"  {write_rows(url, a.rows, np.random.default_rng(0), tmp / 'spill-json', VERSION_JSON, blob=False, feedback=0)}", flush=True)
        eng = make_engine(url)
        t0 = time.perf_counter(); one_round(eng, storage, version, windows["all_rows"], -1); first = time.perf_counter() - t0
        runs = {w: [] for w in windows}
        for rnd in range(a.rounds):
            for w, cfg in windows.items():
                rec = one_round(eng, storage, version, cfg, rnd)
                runs[w].append(rec)
                print(f"  round {rnd} {w}: {rec['n_rows']} rows: run {rec['run']:.3f} s | parts: sql {rec['sql']:.3f} frame {rec['frame']:.3f} "
                      f"reference {rec['reference']:.3f} tests {rec['tests']:.3f} write {rec['write']:.3f} | limit read {rec['limit_read']:.3f}", flush=True)
        extra = json_reader(eng, mon, a.rounds) if a.json_rows else {}
        eng.dispose()
    med = {w: {k: round(statistics.median(r[k] for r in rs), 4) for k in rs[0] if isinstance(rs[0][k], (int, float))} for w, rs in runs.items()}
    result = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]},
              "rows_logged": written, "monitor": {k: getattr(mon, k) for k in ("window_days", "window_rows", "permutations", "max_test_rows",
                                                                              "reference_size", "backend")},
              "first_run_s": round(first, 3), "median_seconds": med, **extra, "rounds": runs, "target_s": TARGET_S,
              "met": med["all_rows"]["run"] < TARGET_S}
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True); out.write_text(json.dumps(result, indent=1, default=float))
    print(f"\n{'window':16} {'rows':>7} {'run':>6} | {'sql':>6} {'frame':>6} {'reader':>6} {'ref':>6} {'tests':>6} {'write':>6} | {'limit':>6}")
    for w, m in med.items():
        print(f"{w:16} {int(m['n_rows']):7d} {m['run']:6.3f} | {m['sql']:6.3f} {m['frame']:6.3f} {m['reader']:6.3f} {m['reference']:6.3f} "
              f"{m['tests']:6.3f} {m['write']:6.3f} | {m['limit_read']:6.3f}")
    print(f"(seconds, medians of {a.rounds} rounds; limit: the same rows' blobs in one query + np.frombuffer; first run, imports included: "
          f"{first:.2f} s{'; reader on JSON rows: %.3f s' % extra['reader_json_rows'] if extra else ''})")
    print(f"target: a monitoring run over all {a.rows} rows < {TARGET_S} s -> {'met' if result['met'] else 'MISSED'}; wrote {out}")


if __name__ == "__main__":
    main()
