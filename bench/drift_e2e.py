"""Drift-detection quality end to end: images POSTed to the real service, rows read back from the prediction log,
the monitor's own drift code on windows of those rows; beside the in-process table.

The model: the default config's deployed version with its detectors and reference data (copied into a temp central
storage, so the bench writes nothing into the project's log); when none is deployed (or it has no detectors), the
config's model section trained briefly here (--train-images, --epochs; the output says so), its detectors built by
`cvops.monitoring.drift_detectors.build_detectors` and its reference data by `cvops.monitoring.drift_detectors.make_reference` (the pipeline's own code:
files' bytes through the service's compiled prepare + predict), published and deployed in the temp storage.

The real service (`cvops serve`, 2 workers) on a free port; pools POSTed once over HTTP (heatmap=false):
  none      new images from the population, independent of the reference: Fashion-MNIST images that are in no split of
            the dataset (`cvops.data.dataset.sample_splits`' picks reproduced and excluded): the train file's ~2,000 left-over
            images (the reference's own distribution) plus --t10k-pool of the t10k file's ~8,000 left-over ones when a
            two-sample check (window_tests, train-file left-overs vs t10k left-overs) finds no difference; JPEG-encoded
            as the dataset's files are (greyscale, quality 95). (Not the reference split's complement: the split is
            class-balanced, so a reference sampled from it and its complement deviate in opposite directions.)
  gn1/gn10/gn100, brightness, rotation, blur   --pool images of the `none` pool shifted as bench/drift_quality.py does (PNG)
  ko        windows drawn from the `none` pool without one class (a random class per draw)
  valid     the whole reference split (its files' bytes): the rows of other candidate references (other seeds, all of it)
The rows are read back with the monitor's reader (`cvops.predlog.queries.read_window` + `cvops.monitoring.check_drift.window_frame`), and every window
(n in --sizes, --draws per cell, sampled from the logged rows) goes through `cvops.monitoring.drift.window_tests`, the function
`check_drift` runs: the four tests, Holm over them, the run-level verdict. The same windows (same image indices, same
seeds) are also run on features computed in-process as bench/drift_quality.py computes them (the detectors called on
the decoded images) -- the in-process table. Per cell the two detection rates are compared with Fisher's exact test
(Holm over all cells); when bench/results/drift_quality.json exists its per-test rates are compared the same way.

No-shift false-alarm rates: against the published reference (conditional on it: what a production team sees; the
headline and the target), against other candidate references (--ref-seeds of --other-reference-size images; the
whole reference split), and against a fresh random reference per window (marginal over reference draws).

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
from cvops.cpu import use_cpu_kernels  # noqa: E402

use_cpu_kernels()   # before numpy loads OpenBLAS, as the `cvops` command does
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from drift_quality import SHIFTS, shift_images            # noqa: E402  the in-process bench's shifts
from service_throughput import bench_service, prepare_storage   # noqa: E402  `cvops serve` on a free port; copy of the deployed version


def png(a: np.ndarray) -> bytes:
    from PIL import Image
    b = io.BytesIO(); Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(b, "PNG"); return b.getvalue()


def jpeg(a: np.ndarray) -> bytes:
    "Encoded as the dataset's files are (cvops.data.dataset.write_split_layout: greyscale JPEG, quality 95)."
    from PIL import Image
    b = io.BytesIO(); Image.fromarray(np.asarray(a, np.uint8), "L").save(b, "JPEG", quality=95); return b.getvalue()


def split_source_indices(src, seed: int = 0) -> dict:
    """`sample_splits`' picks reproduced (the default dataset's build: default quotas, seed 0): the source indices of each
    split in dataset-file order (file images/<split>/<class>/<i>.jpg is position i of the concatenation), and the images of
    each source file that are in no split (`unused_train`: train file, `unused_t10k`: t10k file)."""
    from cvops.data.dataset import ImageSource, sample_splits
    (_, ytr), (_, yte) = src.train, src.test
    ids, _, splits = sample_splits(ImageSource(src.name, src.classes, (np.arange(len(ytr)), ytr), (np.arange(len(yte)), yte)), seed=seed)
    out = {k: ids[splits == k] for k in ("train", "valid", "test")}
    out["order"] = ids
    out["unused_train"] = np.setdiff1d(np.arange(len(ytr)), np.concatenate([out["train"], out["valid"]]))
    out["unused_t10k"] = np.setdiff1d(np.arange(len(yte)), out["test"])
    return out


def setup_version(work: Path, config_path: Path, train_images: int, epochs: int) -> dict:
    "A temp project whose central storage holds one deployed version with detectors + reference data."
    import keras
    from cvops.config import load_config
    from cvops.registry.versions import current_deployment, detector_path, ref_data_path, resolve_version
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
    from cvops.data.preprocess import load_annotations
    from cvops.data.dataset import load_default_source
    from cvops.monitoring.drift_detectors import build_detectors, make_reference
    from cvops.testing import detector_version_files, publish_version, service_project
    from cvops.training.model import build_model, compile_model
    from cvops.registry.publish import publish_model
    from cvops.training.model import save_trained_model
    print(f"{why}: training the default config's model ({cfg.model.model_name}) briefly here: "
          f"{train_images} training images, {epochs} epochs (not the full pipeline's training)", flush=True)
    keras.utils.set_random_seed(0)
    src = load_default_source(); k = len(src.classes)
    tr = split_source_indices(src)["train"][:train_images]   # the dataset's train split only: no reference/pool image
    x, y = src.train[0][tr, ..., None].astype("float32") / 255, src.train[1][tr]
    model = compile_model(build_model(cfg.model, k, seed=0), cfg.model, cfg.train.optimizer, cfg.train.learning_rate)
    model.fit(x, np.eye(k)[y], epochs=epochs, batch_size=cfg.train.batch_size, verbose=0)
    storage = service_project(work) / "central_storage"
    folder = save_trained_model(model, work / "trained", cfg.model, src.classes)
    ds = ROOT / cfg.dataset.path
    ann, classes = load_annotations(ds, cfg.dataset.annotation_file, list(src.classes))
    dets = build_detectors(model, cfg.monitor)
    size = (cfg.model.input_size.w, cfg.model.input_size.h)
    ref = make_reference(dets, ann, ds, classes, size, cfg.model.channels, cfg.monitor, model=model)
    files = detector_version_files(dets, ref, cfg.model.model_name, work / "extra")
    te = split_source_indices(src)["test"]
    xt, yt = src.test[0][te, ..., None].astype("float32") / 255, src.test[1][te]
    acc = float((np.asarray(model(xt)).argmax(1) == yt).mean())
    version = publish_version(storage, folder, cfg.model.model_name, acc, files, classes, 2000, deploy=True, by="bench")
    _, vfolder = resolve_version(storage, cfg.model.model_name, version)
    return dict(cfg=cfg, version=version, name=cfg.model.model_name, folder=vfolder,
                source=f"{why}: the config's model trained here ({train_images} images, {epochs} epochs; "
                       f"accuracy {acc:.3f} on 2000 test images), detectors + reference by cvops.monitoring.drift_detectors")


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
    from cvops.quiet import quiet_tensorflow
    quiet_tensorflow()   # TensorFlow's start-up lines (CUDA factories, cuInit) stay out of the bench's output
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/config.yaml"))
    ap.add_argument("--draws", type=int, default=50, help="windows per (shift, n) cell (>= 50)")
    ap.add_argument("--sizes", default="50,200,1000")
    ap.add_argument("--none-draws", type=int, default=200, help="no-shift windows per n for the false-alarm rates (each reference)")
    ap.add_argument("--pool", type=int, default=2000, help="images per shifted pool (drawn from the no-shift pool)")
    ap.add_argument("--t10k-pool", type=int, default=8000, help="t10k images in no split added to the no-shift pool (at most; if homogeneous; 0: none)")
    ap.add_argument("--ref-seeds", type=lambda s: [int(x) for x in s.split(",") if x], default=[0, 1, 2, 3],
                    help="seeds of other candidate references (the reference lottery), of --other-reference-size images")
    ap.add_argument("--other-reference-size", type=int, default=1000, help="their size (0: the published reference's); 1000 = the old default")
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
    from cvops.data.preprocess import load_annotations, read_image
    from cvops.monitoring.drift_detectors import reference_data
    from cvops.registry.versions import detector_path, ref_data_path
    from cvops.monitoring.drift import RUN_ALERT, TESTS, holm, window_tests
    from cvops.monitoring.check_drift import window_frame
    from cvops.predlog.queries import read_window
    from cvops.predlog.schema import make_engine
    from cvops.settings import default_db_url
    work = Path(tempfile.mkdtemp(prefix="cvops-bench-drift-e2e-"))
    svc = None
    try:
        v = setup_version(work, Path(a.config), a.train_images, a.epochs)
        cfg, name, folder = v["cfg"], v["name"], v["folder"]
        print(f"model: {name} {v['version']} ({v['source']})", flush=True)
        ref = pd.read_parquet(ref_data_path(folder, name))
        from cvops.training.model import read_model_info
        meta_classes = read_model_info(folder)["classes"]
        ds = ROOT / cfg.dataset.path
        ann, classes = load_annotations(ds, cfg.dataset.annotation_file, list(meta_classes))
        mon = cfg.monitor
        size, ch = (cfg.model.input_size.w, cfg.model.input_size.h), cfg.model.channels
        # the no-shift pool: images in no split of the dataset (independent of the reference); checked against the dataset
        from cvops.data.dataset import load_default_source
        from cvops.monitoring.drift_detectors import reference_rows
        src = load_default_source()
        si = split_source_indices(src)
        vrows = ann[ann.split == mon.reference_split]
        pos = vrows.path.str.extract(r"(\d+)\.\w+$")[0].astype(int).to_numpy()
        chk = np.random.default_rng(a.seed).choice(len(vrows), min(200, len(vrows)), replace=False)
        decoded = np.stack([np.asarray(read_image(ds / vrows.path.iloc[i], size, ch))[..., 0] for i in chk]).astype(float)
        raw_src = src.train[0] if mon.reference_split != "test" else src.test[0]
        mad = float(np.abs(decoded - raw_src[si["order"][pos[chk]]].astype(float)).mean())
        if mad > 4: raise RuntimeError(f"the dataset's {mon.reference_split} files are not sample_splits' default picks "
                                       f"(mean |pixel difference| {mad:.1f}): cannot tell which source images are in no split")
        pooldir = work / "pool"; pooldir.mkdir()
        def pool_files(arr, idx, tag):
            out = []
            for i in idx:
                f = pooldir / f"{tag}-{i:05d}.jpg"; f.write_bytes(jpeg(arr[i])); out.append(f)
            return out
        rs = np.random.default_rng(a.seed)
        ut, u10 = si["unused_train"], si["unused_t10k"]
        u10 = np.sort(rs.choice(u10, min(a.t10k_pool, len(u10)), replace=False)) if a.t10k_pool > 0 else u10[:0]
        files_tr, files_10 = pool_files(src.train[0], ut, "train"), pool_files(src.test[0], u10, "t10k")
        x_tr = np.stack([read_image(f, size, ch) for f in files_tr]); y_tr = src.train[1][ut]
        x_10 = np.stack([read_image(f, size, ch) for f in files_10]) if len(files_10) else x_tr[:0]; y_10 = src.test[1][u10]
        dets = {k: keras.models.load_model(detector_path(folder, name, k), compile=False) for k in ("uae", "bbsd")}
        # are the t10k left-overs the train file's distribution for these features? (the monitor's tests, n 2000 vs t10k-pool)
        homog = None
        if len(x_10):
            f_tr, f_10 = reference_data(dets, x_tr, None, classes), reference_data(dets, x_10, None, classes)
            hc = mon.model_copy(update={"permutations": 500, "min_rows": 2})
            recs = window_tests(f_tr, f_10, classes, hc, seed=a.seed)
            homog = dict(p_raw={r["test"]: r["p_value"] for r in recs[1:]}, p_holm=recs[0]["details"].get("p_holm_by_test"),
                         same=recs[0]["verdict"] != "drift", n_train_file=len(x_tr), n_t10k=len(x_10),
                         bbsd_accuracy={"train_file": float((f_tr[[c for c in f_tr if c.startswith("bbsd_")]].to_numpy().argmax(1) == y_tr).mean()),
                                        "t10k": float((f_10[[c for c in f_10 if c.startswith("bbsd_")]].to_numpy().argmax(1) == y_10).mean())})
            print(f"train-file vs t10k left-overs ({len(x_tr)} vs {len(x_10)}): Holm p {homog['p_holm']} -> "
                  f"{'same distribution for these features: mixed' if homog['same'] else 'they DIFFER: the pool is the train file only'}", flush=True)
        mixed = bool(homog and homog["same"])
        pool_files_all = files_tr + (files_10 if mixed else [])
        x_none = np.concatenate([x_tr, x_10]) if mixed else x_tr
        y_none = np.concatenate([y_tr, y_10]) if mixed else y_tr
        origin = np.array(["train"] * len(x_tr) + (["t10k"] * len(x_10) if mixed else []))
        sub = np.sort(rs.choice(len(x_none), min(a.pool, len(x_none)), replace=False))   # the shifted pools' images
        print(f"pools: none {len(x_none)} images in no split ({len(x_tr)} train-file" + (f" + {len(x_10)} t10k" if mixed else "")
              + f"); shifts {', '.join(SHIFTS[1:])} on {len(sub)} of them; reference {len(ref)} images", flush=True)
        shifted = {k: (x_none if k in ("none", "ko") else shift_images(x_none[sub], k, np.random.default_rng(a.seed + i))) for i, k in enumerate(SHIFTS)}
        labels = {k: (y_none if k in ("none", "ko") else y_none[sub]) for k in SHIFTS}
        # in-process features, as bench/drift_quality.py computes them
        inproc = {k: reference_data(dets, shifted[k], None, classes) for k in SHIFTS if k != "ko"}
        inproc["ko"] = inproc["none"]
        # end to end: POST each pool once (and the whole reference split), read the rows back with the monitor's reader
        svc = bench_service(work, a.workers, v["version"])
        t_post = time.time(); ids = {}
        for k in SHIFTS:
            if k == "ko": continue
            payloads = [f.read_bytes() for f in pool_files_all] if k == "none" else [png(im) for im in shifted[k]]
            ids[k] = post_all(svc.port, payloads)
            print(f"  posted {k}: {len(payloads)} images ({time.time() - t_post:.0f} s)", flush=True)
        ids_valid = post_all(svc.port, [(ds / p_).read_bytes() for p_ in vrows.path])
        print(f"  posted {mon.reference_split}: {len(vrows)} images ({time.time() - t_post:.0f} s)", flush=True)
        n_posted = sum(len(v_) for v_ in ids.values()) + len(ids_valid)
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
        lvalid = frame.loc[ids_valid].reset_index(drop=True); lvalid.index = vrows.path.to_numpy()
        fcols = logged["none"].filter(regex="^(uae|bbsd)_").columns
        diff = {k: float(np.max(np.abs(logged[k][fcols].to_numpy() - inproc[k][fcols].to_numpy()))) for k in ids}
        diff_ref = float(np.max(np.abs(lvalid.loc[ref["path"], fcols].to_numpy() - ref[fcols].to_numpy()))) if "path" in ref else None
        print(f"rows read back: {len(rows)} (window_frame: {read_s:.2f} s); largest |logged - in-process| feature difference per pool: "
              + ", ".join(f"{k} {d:.2g}" for k, d in diff.items()) + f"; logged reference-split rows vs the published reference: {diff_ref}", flush=True)
        svc.stop(); svc = None
        # windows: the monitor's drift code on logged rows and on in-process rows, same indices and seeds
        sizes = [int(s) for s in a.sizes.split(",")]
        mcfg = mon.model_copy(update={"permutations": a.permutations, "min_rows": min(mon.min_rows, min(sizes))})
        rng = np.random.default_rng(a.seed)
        raw = []
        t_win = time.time()
        for kind in SHIFTS:
            y = labels[kind]
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
        fa_table = {str(n): {t: rate_ci(none[(none.n == n) & (none.test == t)].decision) for t in (RUN_ALERT,) + TESTS} for n in sizes}
        fa_holm = {str(n): {t: rate_ci(none[(none.n == n) & (none.test == t)].alert) for t in TESTS} for n in sizes}
        # the same no-shift windows against other candidate references: the published reference's size with other seeds
        # (the reference lottery), and the whole reference split; rows = the logged rows of those images
        # the no-shift windows of the false-alarm rates: --none-draws per n (more than the table's --draws: a rate near alpha
        # needs them), drawn from the no-shift pool with their own seed
        rn = np.random.default_rng(a.seed + 1)
        none_windows = [(n, d, rn.choice(len(y_none), min(n, len(y_none)), replace=False), int(rn.integers(2**31)))
                        for n in sizes for d in range(a.none_draws)]
        def fixed_rates(reference):
            hits = {str(n): {t: [] for t in (RUN_ALERT,) + TESTS} for n in sizes}
            for n, d, idx, seed in none_windows:
                for r in window_tests(reference, logged["none"].iloc[idx].reset_index(drop=True), classes, mcfg, seed=seed):
                    hits[str(n)][r["test"]].append(r["verdict"] == "drift" if r["test"] == RUN_ALERT else (r["p_value"] is not None and r["p_value"] < mcfg.alpha))
            return {n: {t: rate_ci(pd.Series(h)) for t, h in hn.items()} for n, hn in hits.items()}
        fa = fixed_rates(ref)   # the headline: conditional on the published reference
        met = all(fa[str(n)][RUN_ALERT]["rate"] <= mcfg.alpha for n in sizes)
        print("  no-shift windows against the published reference: " + ", ".join(f"n={n} {fa[n][RUN_ALERT]['rate']:.3f}" for n in fa), flush=True)
        others = {}
        m_alt = a.other_reference_size or len(ref)
        cands = [(f"seed {s_}, {m_alt} images", reference_rows(ann, mon.reference_split, m_alt, s_).path) for s_ in a.ref_seeds]
        if len(vrows) != len(ref): cands.append((f"all {len(vrows)} {mon.reference_split} images", vrows.path))
        for label, paths in cands:
            t_o = time.time()
            others[label] = dict(n_reference=len(paths), rates=fixed_rates(lvalid.loc[list(paths)].reset_index(drop=True)))
            print(f"  no-shift windows against the reference {label}: " + ", ".join(
                f"n={n} {others[label]['rates'][n][RUN_ALERT]['rate']:.2f}" for n in others[label]["rates"]) + f" ({time.time() - t_o:.0f} s)", flush=True)
        # fresh reference per window (marginal over reference draws): len(ref) rows drawn at random from the logged
        # reference-split rows and the no-shift pool together, the window from the rest
        both = pd.concat([lvalid.reset_index(drop=True), logged["none"]], ignore_index=True)
        fresh = {}
        for n in sizes:
            hits = {t: [] for t in (RUN_ALERT,) + TESTS}
            for d in range(a.none_draws):
                perm = rng.permutation(len(both)); r_idx, w_idx = perm[:len(ref)], perm[len(ref):len(ref) + n]
                for r in window_tests(both.iloc[r_idx].reset_index(drop=True), both.iloc[w_idx].reset_index(drop=True), classes, mcfg,
                                      seed=int(rng.integers(2**31))):
                    hits[r["test"]].append(r["verdict"] == "drift" if r["test"] == RUN_ALERT else (r["p_value"] is not None and r["p_value"] < mcfg.alpha))
            fresh[str(n)] = {t: rate_ci(pd.Series(h)) for t, h in hits.items()}
        print("  fresh-reference no-shift windows done", flush=True)
        distinct = {str(n): int(len(np.unique(np.concatenate([w[2] for w in none_windows if w[0] == n])))) for n in sizes}
        result = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "model": {"name": name, "version": v["version"]}, "source": v["source"], "n_reference": len(ref),
            "reference": f"the published reference: {len(ref)} {mon.reference_split} images (monitor.reference_size, seed {mon.seed})",
            "pool": {"images": len(x_none), "train_file": int((origin == "train").sum()), "t10k": int((origin == "t10k").sum()),
                     "in_no_split": True, "shifted_pool_images": len(sub), "train_file_vs_t10k": homog,
                     "distinct_images_in_no_shift_windows": distinct,
                     "expected_overlap_of_two_windows": {str(n): round(n * n / len(x_none), 1) for n in sizes}},
            "posted": n_posted, "post_seconds": round(post_s, 1), "read_seconds": round(read_s, 2),
            "max_feature_difference_e2e_vs_in_process": diff, "max_feature_difference_logged_vs_published_reference": diff_ref,
            "sizes": sizes, "draws": a.draws, "shifts": list(SHIFTS), "tests": list(TESTS), "alpha": mcfg.alpha,
            "permutations": a.permutations, "min_rows": mcfg.min_rows, "max_test_rows": mcfg.max_test_rows,
            "none_draws": a.none_draws, "false_alarm_rate": fa, "false_alarm_rate_table_windows": fa_table,
            "false_alarm_rate_holm_per_test_table_windows": fa_holm,
            "false_alarm_rate_other_references": others, "false_alarm_rate_fresh_reference": fresh,
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
    pl = r["pool"]; hm = pl.get("train_file_vs_t10k")
    pool_txt = (f"{pl['images']} Fashion-MNIST images in no split of the dataset ({pl['train_file']} left over in the train file"
                + (f" + {pl['t10k']} of the t10k file's left-overs" if pl["t10k"] else "") + "), JPEG-encoded as the dataset's files")
    lines = [f"# Drift detection end to end ({r['created']})", "",
             f"Model {r['model']['name']} {r['model']['version']}: {r['source']}. Reference: {r['reference']}. No-shift pool: "
             f"{pool_txt}: new images independent of the reference; shifted pools: {pl['shifted_pool_images']} of them shifted. "
             f"POSTed to the real service ({r['posted']} requests, the whole reference split included, in {r['post_seconds']} s), rows "
             f"read back with the monitor's reader ({r['read_seconds']} s). {r['draws']} windows per cell, alpha {r['alpha']}, "
             f"{r['permutations']} permutations, max_test_rows {r.get('max_test_rows')}.", ""]
    if hm: lines += [f"Train-file vs t10k left-overs ({hm['n_train_file']} vs {hm['n_t10k']} images, the monitor's four tests, 500 permutations): "
                     + ", ".join(f"{t} p {p:.3g}" for t, p in hm["p_raw"].items()) + f"; BBSD accuracy {hm['bbsd_accuracy']['train_file']:.3f} vs "
                     f"{hm['bbsd_accuracy']['t10k']:.3f}: " + ("no difference found, mixed." if hm["same"] else "they DIFFER: the pool is the train file's only."), ""]
    d = pl["distinct_images_in_no_shift_windows"]; ov = pl["expected_overlap_of_two_windows"]
    lines += ["Finite pool: the no-shift windows draw on " + ", ".join(f"{d[n]} distinct images at n={n}" for n in d)
              + " (two windows share about " + ", ".join(f"{ov[n]:g}" for n in ov) + " images): windows of the larger n overlap, so their "
              "decisions are positively correlated and the rates' binomial intervals are somewhat too narrow there.", "",
              "Rates: per test the raw decision (p < alpha, as the in-process table counts); `run_alert` = the run-level verdict "
              "(Holm over the four tests). Each cell: e2e / in-process (same windows, features computed in-process).", ""]
    tests = ["run_alert"] + r["tests"]
    lines.append("| shift | n | " + " | ".join(tests) + " |")
    lines.append("|---|---|" + "---|" * len(tests))
    for (shift, n), g in cells.groupby(["shift", "n"], sort=False):
        g = g.set_index("test")
        lines.append(f"| {shift} | {n} | " + " | ".join(f"{g.loc[t, 'e2e']:.2f} / {g.loc[t, 'in_process']:.2f}" for t in tests) + " |")
    fa = r["false_alarm_rate"]
    lines += ["", "## No-shift false-alarm rates (e2e)", "",
              "Conditional = against one fixed reference (every window shares it: what a production team sees); the first row, "
              f"the published reference, is the headline. Marginal = a fresh random reference per window. {r['none_draws']} "
              "no-shift windows per n (the same windows for every fixed reference; drawn apart from the table's).", "",
              "| reference | n | run_alert (95% upper) | " + " | ".join(r["tests"]) + " |", "|---|---|---|" + "---|" * len(r["tests"])]
    refs = [(f"**published** ({r['n_reference']})", fa)] + [(f"{k}", v["rates"]) for k, v in r.get("false_alarm_rate_other_references", {}).items()]
    if r.get("false_alarm_rate_fresh_reference"): refs.append((f"fresh per window ({r['n_reference']}, marginal)", r["false_alarm_rate_fresh_reference"]))
    for label, rt in refs:
        for n in rt:
            ra = rt[n]["run_alert"]
            lines.append(f"| {label} | {n} | {ra['rate']:.2f} ({ra['upper95']:.2f}) | " + " | ".join(f"{rt[n][t]['rate']:.2f}" for t in r["tests"]) + " |")
    met = r["target"]["run-level false-alarm rate <= alpha at every n"]
    lines += ["", "Headline: run-level false-alarm rate against the published reference: " + ", ".join(
        f"n={n}: {fa[n]['run_alert']['rate']:.3f} (95% upper {fa[n]['run_alert']['upper95']:.3f}, {fa[n]['run_alert']['windows']} windows)" for n in fa)
        + f"; target <= {r['alpha']} at every n: **{'met' if met else 'NOT met'}**."]
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
