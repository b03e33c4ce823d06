"""Drift-detection quality end to end: images POSTed to the real service, rows read back from the prediction log,
the monitor's own drift code on windows of those rows; beside the in-process table.

The model: the default config's deployed version with its detectors and reference data (copied into a temp central
storage, so the bench writes nothing into the project's log); when none is deployed (or it has no detectors), the
config's model section trained briefly here (--train-images, --epochs; the output says so), its detectors built by
`cvops.detectors.build_detectors` and its reference data by `cvops.detectors.make_reference` (the pipeline's own code:
files' bytes through the service's compiled prepare + predict), published and deployed in the temp storage.

The real service (`cvops serve`, 2 workers) on a free port; pools POSTed once over HTTP (heatmap=false):
  none      images of the reference's split (monitor.reference_split) that are not in the reference (their files' bytes)
  gn1/gn10/gn100, brightness, rotation, blur   the same images shifted as bench/drift_quality.py shifts them (PNG)
  ko        windows drawn from the `none` pool without one class (a random class per draw)
The rows are read back with the monitor's reader (`cvops.monitor.read_window` + `window_frame`), and every window
(n in --sizes, --draws per cell, sampled from the logged rows) goes through `cvops.drift.window_tests`, the function
`check_drift` runs: the four tests, Holm over them, the run-level verdict. The same windows (same image indices, same
seeds) are also run on features computed in-process as bench/drift_quality.py computes them (the detectors called on
the decoded images) -- the in-process table. Per cell the two detection rates are compared with Fisher's exact test
(Holm over all cells); when bench/results/drift_quality.json exists its per-test rates are compared the same way.

    python bench/drift_e2e.py [--draws 50] [--sizes 50,200,1000] [--permutations 100] [--out bench/results/drift_e2e.json]
"""
import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from drift_quality import SHIFTS, shift_images            # noqa: E402  the in-process bench's shifts
from service_throughput import Service, prepare_storage   # noqa: E402  `cvops serve` on a free port; copy of the deployed version


def png(a: np.ndarray) -> bytes:
    from PIL import Image
    b = io.BytesIO(); Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(b, "PNG"); return b.getvalue()


def setup_version(work: Path, config_path: Path, train_images: int, epochs: int) -> dict:
    "A temp project whose central storage holds one deployed version with detectors + reference data."
    import keras
    from cvops.config import load_config
    from cvops.deploy import current_deployment, resolve_version
    from cvops.detectors import detector_path, ref_data_path
    cfg = load_config(config_path)
    rec = current_deployment(ROOT / "central_storage") if (ROOT / "central_storage").exists() else None
    if rec is not None:
        _, folder = resolve_version(ROOT / "central_storage", rec["model_name"], rec["version"])
        if detector_path(folder, rec["model_name"], "uae").exists() and ref_data_path(folder, rec["model_name"]).exists():
            info = prepare_storage(ROOT, work, config_path)
            return dict(cfg=cfg, version=info["version"], name=info["model_name"], folder=Path(info["folder"]),
                        source=f"the deployed version {info['version']} with its published detectors and reference data")
        why = f"the deployed version {rec['version']} has no detectors/reference data"
    else: why = "nothing is deployed in central_storage/"
    # train the config's model briefly, then the pipeline's own detector + reference code, publish, deploy
    from cvops.data import load_annotations
    from cvops.dataset import load_default_source
    from cvops.deploy import deploy
    from cvops.detectors import build_detectors, make_reference, save_detectors
    from cvops.model import build_model, compile_model
    from cvops.publish import publish_model
    from cvops.train import save_trained_model
    print(f"{why}: training the default config's model ({cfg.model.model_name}) briefly here: "
          f"{train_images} training images, {epochs} epochs (not the full pipeline's training)", flush=True)
    keras.utils.set_random_seed(0)
    src = load_default_source(); k = len(src.classes)
    x, y = src.train[0][:train_images, ..., None].astype("float32") / 255, src.train[1][:train_images]
    model = compile_model(build_model(cfg.model, k, seed=0), cfg.model, cfg.train.optimizer, cfg.train.learning_rate)
    model.fit(x, np.eye(k)[y], epochs=epochs, batch_size=cfg.train.batch_size, verbose=0)
    storage = work / "central_storage"; (storage / "models").mkdir(parents=True); (work / "pipeline.yaml").write_text("tasks: []\n")
    folder = save_trained_model(model, work / "trained", cfg.model, src.classes)
    ds = ROOT / cfg.dataset.path
    ann, classes = load_annotations(ds, cfg.dataset.annotation_file, list(src.classes))
    dets = build_detectors(model, cfg.monitor)
    size = (cfg.model.input_size.w, cfg.model.input_size.h)
    ref = make_reference(dets, ann, ds, classes, size, cfg.model.channels, cfg.monitor, model=model)
    extra = work / "extra"
    paths = {kd: detector_path(extra, cfg.model.model_name, kd) for kd in dets} | {"ref_data": ref_data_path(extra, cfg.model.model_name)}
    files = {Path(p).relative_to(extra).as_posix(): Path(p) for p in save_detectors(dets, ref, paths).values()}
    xt, yt = src.test[0][:2000, ..., None].astype("float32") / 255, src.test[1][:2000]
    acc = float((np.asarray(model(xt)).argmax(1) == yt).mean())
    meta = {"model_name": cfg.model.model_name, "model": {"model_name": cfg.model.model_name, "classes": list(classes)},
            "metrics": {"accuracy": acc, "n_images": 2000}, "lineage": {}}
    version = publish_model(folder, meta, storage, files)["version"]
    deploy(storage, cfg.model.model_name, version, by="bench")
    _, vfolder = resolve_version(storage, cfg.model.model_name, version)
    return dict(cfg=cfg, version=version, name=cfg.model.model_name, folder=vfolder,
                source=f"{why}: the config's model trained here ({train_images} images, {epochs} epochs; "
                       f"accuracy {acc:.3f} on 2000 test images), detectors + reference by cvops.detectors")


def post_all(port: int, payloads: list, threads: int = 8) -> list:
    "POST every payload to /predict?heatmap=false; the request ids, in order."
    import requests
    local = threading.local()
    def one(data):
        s = getattr(local, "s", None) or requests.Session(); local.s = s
        for attempt in range(5):
            r = s.post(f"http://127.0.0.1:{port}/predict?heatmap=false", files={"file": ("x.png", data, "image/png")}, timeout=60)
            if r.status_code == 200: return r.json()["request_id"]
            time.sleep(0.2 * (attempt + 1))
        raise RuntimeError(f"/predict answered {r.status_code}: {r.text[:300]}")
    with ThreadPoolExecutor(threads) as ex: return list(ex.map(one, payloads))


def fisher_p(k1, n1, k2, n2) -> float:
    from scipy.stats import fisher_exact
    return float(fisher_exact([[k1, n1 - k1], [k2, n2 - k2]])[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/config.yaml"))
    ap.add_argument("--draws", type=int, default=50, help="windows per (shift, n) cell (>= 50)")
    ap.add_argument("--sizes", default="50,200,1000")
    ap.add_argument("--pool", type=int, default=2000, help="images per pool (the reference split's images not in the reference, at most)")
    ap.add_argument("--permutations", type=int, default=100, help="as bench/drift_quality.py (MMD p resolution 1/101)")
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/drift_e2e.json"))
    a = ap.parse_args(argv)
    t0 = time.time()
    import keras
    import pandas as pd
    from scipy.stats import beta
    from cvops.data import load_annotations, read_image
    from cvops.detectors import detector_path, ref_data_path, reference_data
    from cvops.drift import RUN_ALERT, TESTS, holm, window_tests
    from cvops.monitor import read_window, window_frame
    from cvops.predlog import default_db_url, make_engine
    work = Path(tempfile.mkdtemp(prefix="cvops-bench-drift-e2e-"))
    svc = None
    try:
        v = setup_version(work, Path(a.config), a.train_images, a.epochs)
        cfg, name, folder = v["cfg"], v["name"], v["folder"]
        print(f"model: {name} {v['version']} ({v['source']})", flush=True)
        ref = pd.read_parquet(ref_data_path(folder, name))
        meta_classes = json.loads((folder / "model_info.json").read_text())["classes"]
        ds = ROOT / cfg.dataset.path
        ann, classes = load_annotations(ds, cfg.dataset.annotation_file, list(meta_classes))
        mon = cfg.monitor
        size, ch = (cfg.model.input_size.w, cfg.model.input_size.h), cfg.model.channels
        in_ref = set(ref["path"]) if "path" in ref else set()
        pool_rows = ann[(ann.split == mon.reference_split) & ~ann.path.isin(in_ref)]
        pool_rows = pool_rows.sample(min(a.pool, len(pool_rows)), random_state=a.seed).reset_index(drop=True)
        y = pool_rows[list(classes)].to_numpy().argmax(1)
        x = np.stack([read_image(ds / p, size, ch) for p in pool_rows.path])
        print(f"pools: {len(pool_rows)} {mon.reference_split} images not in the {len(ref)}-image reference; shifts {', '.join(SHIFTS[1:])}", flush=True)
        shifted = {k: (x if k in ("none", "ko") else shift_images(x, k, np.random.default_rng(a.seed + i))) for i, k in enumerate(SHIFTS)}
        # in-process features, as bench/drift_quality.py computes them
        dets = {k: keras.models.load_model(detector_path(folder, name, k), compile=False) for k in ("uae", "bbsd")}
        inproc = {k: reference_data(dets, shifted[k], None, classes) for k in SHIFTS if k != "ko"}
        inproc["ko"] = inproc["none"]
        # end to end: POST each pool once, read the rows back with the monitor's reader
        svc = Service(work, a.workers).start(v["version"])
        t_post = time.time(); ids = {}
        for k in SHIFTS:
            if k == "ko": continue
            payloads = [(ds / p).read_bytes() for p in pool_rows.path] if k == "none" else [png(im) for im in shifted[k]]
            ids[k] = post_all(svc.port, payloads)
            print(f"  posted {k}: {len(payloads)} images ({time.time() - t_post:.0f} s)", flush=True)
        n_posted = sum(len(v_) for v_ in ids.values())
        post_s = time.time() - t_post
        engine = make_engine(default_db_url(work))
        deadline = time.time() + 120
        while True:
            rows = read_window(engine, v["version"])
            if len(rows) >= n_posted or time.time() > deadline: break
            time.sleep(0.5)
        engine.dispose()
        if len(rows) < n_posted: raise RuntimeError(f"only {len(rows)} of {n_posted} predictions logged after 120 s")
        t_read = time.time()
        frame = window_frame(rows); frame.index = rows.request_id.to_numpy()
        read_s = time.time() - t_read
        logged = {k: frame.loc[ids[k]].reset_index(drop=True) for k in ids}
        logged["ko"] = logged["none"]
        diff = {k: float(np.max(np.abs(logged[k].filter(regex="^(uae|bbsd)_").to_numpy() - inproc[k][logged[k].filter(regex="^(uae|bbsd)_").columns].to_numpy())))
                for k in ids}
        print(f"rows read back: {len(rows)} (window_frame: {read_s:.2f} s); largest |logged - in-process| feature difference per pool: "
              + ", ".join(f"{k} {d:.2g}" for k, d in diff.items()), flush=True)
        svc.stop(); svc = None
        # windows: the monitor's drift code on logged rows and on in-process rows, same indices and seeds
        sizes = [int(s) for s in a.sizes.split(",")]
        mcfg = mon.model_copy(update={"permutations": a.permutations, "min_rows": min(mon.min_rows, min(sizes))})
        rng = np.random.default_rng(a.seed)
        raw = []
        t_win = time.time()
        for kind in SHIFTS:
            for n in sizes:
                for d in range(a.draws):
                    ko = int(rng.integers(len(classes))) if kind == "ko" else None
                    pool = np.flatnonzero(y != ko) if kind == "ko" else np.arange(len(y))
                    idx = rng.choice(pool, min(n, len(pool)), replace=False)
                    seed = int(rng.integers(2**31))
                    for path, feats in (("e2e", logged[kind]), ("in_process", inproc[kind])):
                        for r in window_tests(ref, feats.iloc[idx].reset_index(drop=True), classes, mcfg, seed=seed):
                            raw.append(dict(shift=kind, n=n, draw=d, path=path, test=r["test"], p=r["p_value"],
                                            raw=r["p_value"] is not None and r["p_value"] < mcfg.alpha, alert=r["verdict"] == "drift"))
            print(f"  windows {kind}: {time.time() - t_win:.0f} s", flush=True)
        df = pd.DataFrame(raw)
        # per-test rate = raw decision (p < alpha, as the in-process table counts); run_alert = the run-level verdict (Holm)
        df["decision"] = np.where(df.test == RUN_ALERT, df.alert, df.raw)
        rates = df.groupby(["path", "test", "shift", "n"]).decision.agg(["sum", "count"])
        cells, pvals = [], []
        for (test, kind, n), _ in rates.loc["e2e"].groupby(level=[0, 1, 2]):
            e, i = rates.loc[("e2e", test, kind, n)], rates.loc[("in_process", test, kind, n)]
            p = fisher_p(int(e["sum"]), int(e["count"]), int(i["sum"]), int(i["count"]))
            paired = df[(df.test == test) & (df["shift"] == kind) & (df.n == n)].pivot_table(index="draw", columns="path", values="decision")
            cells.append(dict(test=test, shift=kind, n=int(n), e2e=float(e["sum"] / e["count"]), in_process=float(i["sum"] / i["count"]),
                              windows=int(e["count"]), fisher_p=p, paired_decisions_differ=float((paired["e2e"] != paired["in_process"]).mean())))
            pvals.append(p)
        adj = holm(pvals)
        for c, q in zip(cells, adj): c["fisher_p_holm"] = float(q)
        agree = bool(min(adj) >= 0.05)
        # against today's in-process table (bench/drift_quality.py's results), where it exists
        dq_path = ROOT / "bench/results/drift_quality.json"; vs_quality = None
        if dq_path.exists():
            dq = json.loads(dq_path.read_text()); dqr = dq.get("detection_rate", {}).get("cvops", {})
            comp = []
            for c in cells:
                q = dqr.get(c["test"], {}).get(c["shift"], {}).get(str(c["n"]))
                if q is None: continue
                k2, n2 = round(q * dq["draws"]), dq["draws"]
                comp.append(dict(test=c["test"], shift=c["shift"], n=c["n"], e2e=c["e2e"], drift_quality=q,
                                 fisher_p=fisher_p(round(c["e2e"] * c["windows"]), c["windows"], k2, n2)))
            if comp:
                for c, q in zip(comp, holm([c["fisher_p"] for c in comp])): c["fisher_p_holm"] = float(q)
                vs_quality = dict(model=dq.get("model"), features_source=dq.get("features_source"), cells=comp,
                                  agree=bool(min(c["fisher_p_holm"] for c in comp) >= 0.05),
                                  note="drift_quality windows come from the test split and its own draws; a different model when "
                                       "its model differs (see model)")
        # targets: run-level false-alarm rate <= alpha at every n
        none = df[(df["shift"] == "none") & (df.path == "e2e")]
        def rate_ci(s):
            k, m = int(s.sum()), len(s)
            return dict(rate=k / m, windows=m, upper95=float(beta.ppf(0.975, k + 1, m - k)) if k < m else 1.0)
        fa = {str(n): {t: rate_ci(none[(none.n == n) & (none.test == t)].decision) for t in (RUN_ALERT,) + TESTS} for n in sizes}
        fa_holm = {str(n): {t: rate_ci(none[(none.n == n) & (none.test == t)].alert) for t in TESTS} for n in sizes}
        met = all(fa[str(n)][RUN_ALERT]["rate"] <= mcfg.alpha for n in sizes)
        # the same no-shift windows against a fresh reference each time: 1000 rows drawn from the published reference rows and
        # the logged pool together, the window from the rest. Under no drift this rate is alpha whatever the reference's luck;
        # the fixed-reference rate above is conditional on the one published reference (all windows share it, so they are
        # correlated, and the more so the larger n is next to the reference).
        both = pd.concat([ref[logged["none"].columns.drop("predicted")].assign(predicted=ref["predicted"]), logged["none"]], ignore_index=True)
        fresh = {}
        for n in sizes:
            hits = {t: [] for t in (RUN_ALERT,) + TESTS}
            for d in range(a.draws):
                perm = rng.permutation(len(both)); r_idx, w_idx = perm[:len(ref)], perm[len(ref):len(ref) + n]
                for r in window_tests(both.iloc[r_idx].reset_index(drop=True), both.iloc[w_idx].reset_index(drop=True), classes, mcfg,
                                      seed=int(rng.integers(2**31))):
                    hits[r["test"]].append(r["verdict"] == "drift" if r["test"] == RUN_ALERT else (r["p_value"] is not None and r["p_value"] < mcfg.alpha))
            fresh[str(n)] = {t: rate_ci(pd.Series(h)) for t, h in hits.items()}
        print("  fresh-reference no-shift windows done", flush=True)
        result = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "model": {"name": name, "version": v["version"]}, "source": v["source"], "n_reference": len(ref),
            "pool": {"images": len(pool_rows), "split": mon.reference_split, "not_in_reference": True}, "posted": n_posted,
            "post_seconds": round(post_s, 1), "read_seconds": round(read_s, 2), "max_feature_difference_e2e_vs_in_process": diff,
            "sizes": sizes, "draws": a.draws, "shifts": list(SHIFTS), "tests": list(TESTS), "alpha": mcfg.alpha,
            "permutations": a.permutations, "min_rows": mcfg.min_rows,
            "false_alarm_rate": fa, "false_alarm_rate_holm_per_test": fa_holm, "false_alarm_rate_fresh_reference": fresh,
            "target": {"run-level false-alarm rate <= alpha at every n": met},
            "cells": cells, "e2e_vs_in_process_agree": agree, "vs_drift_quality": vs_quality,
            "seconds_total": round(time.time() - t0, 1),
        }
        out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=float))
        md = markdown(result)
        out.with_suffix(".md").write_text(md)
        print(md)
        print(f"wrote {out} and {out.with_suffix('.md')} ({result['seconds_total']:.0f} s)")
    finally:
        if svc is not None: svc.stop()
        shutil.rmtree(work, ignore_errors=True)


def markdown(r: dict) -> str:
    import pandas as pd
    cells = pd.DataFrame(r["cells"])
    lines = [f"# Drift detection end to end ({r['created']})", "",
             f"Model {r['model']['name']} {r['model']['version']}: {r['source']}. Reference {r['n_reference']} images; pools of "
             f"{r['pool']['images']} {r['pool']['split']} images not in the reference, POSTed to the real service "
             f"({r['posted']} requests in {r['post_seconds']} s), rows read back with the monitor's reader "
             f"({r['read_seconds']} s). {r['draws']} windows per cell, alpha {r['alpha']}, {r['permutations']} permutations.", "",
             "Rates: per test the raw decision (p < alpha, as the in-process table counts); `run_alert` = the run-level verdict "
             "(Holm over the four tests). Each cell: e2e / in-process (same windows, features computed in-process).", ""]
    tests = ["run_alert"] + r["tests"]
    lines.append("| shift | n | " + " | ".join(tests) + " |")
    lines.append("|---|---|" + "---|" * len(tests))
    for (shift, n), g in cells.groupby(["shift", "n"], sort=False):
        g = g.set_index("test")
        lines.append(f"| {shift} | {n} | " + " | ".join(f"{g.loc[t, 'e2e']:.2f} / {g.loc[t, 'in_process']:.2f}" for t in tests) + " |")
    fa = r["false_alarm_rate"]
    lines += ["", "Run-level false-alarm rate (no shift, e2e): " + ", ".join(
        f"n={n}: {fa[n]['run_alert']['rate']:.3f} (95% upper {fa[n]['run_alert']['upper95']:.3f}, {fa[n]['run_alert']['windows']} windows)" for n in fa)
        + f"; target <= {r['alpha']} at every n: {'met' if r['target']['run-level false-alarm rate <= alpha at every n'] else 'NOT met'}."]
    fr = r.get("false_alarm_rate_fresh_reference")
    if fr: lines.append("Same windows against a fresh random reference each (reference rows + logged pool, disjoint): run-level "
                        + ", ".join(f"n={n}: {fr[n]['run_alert']['rate']:.3f} (95% upper {fr[n]['run_alert']['upper95']:.3f})" for n in fr)
                        + "; per test at n=" + list(fr)[-1] + ": " + ", ".join(f"{t} {v['rate']:.2f}" for t, v in fr[list(fr)[-1]].items() if t != "run_alert")
                        + ". The fixed-reference rate is conditional on the one published reference: every window shares it.")
    worst = cells.loc[cells.fisher_p.idxmin()]
    lines.append(f"e2e vs in-process: {'agree' if r['e2e_vs_in_process_agree'] else 'DISAGREE'} within sampling error "
                 f"(Fisher's exact test per cell, Holm over {len(cells)} cells; smallest adjusted p {cells.fisher_p_holm.min():.3g} at "
                 f"{worst['test']} {worst['shift']} n={worst['n']}); paired windows with a different decision: at most "
                 f"{cells.paired_decisions_differ.max():.3f} of a cell.")
    vq = r.get("vs_drift_quality")
    if vq: lines.append(f"e2e vs bench/results/drift_quality.json (model {vq['model']}): {'agree' if vq['agree'] else 'DISAGREE'} "
                        f"within sampling error over {len(vq['cells'])} cells (smallest Holm-adjusted p "
                        f"{min(c['fisher_p_holm'] for c in vq['cells']):.3g}).")
    else: lines.append("bench/results/drift_quality.json: not present, no comparison with it.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
