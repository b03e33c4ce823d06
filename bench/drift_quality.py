"""Drift-detection quality: detection rate, false-positive rate and time per check of every drift test, both backends.

Following Rabanser et al., "Failing Loudly" (NeurIPS 2019): the current window is n images of the default
model's test split, shifted; the reference is the version's reference data (monitor.reference_size images of
monitor.reference_split, which the model was not fitted on). Shifts (applied to every image of the window, on the
0-255 scale, then rounded and clipped to uint8 as the service would see them):
  none          no shift (the false-positive rate)
  gn1/gn10/gn100  additive gaussian noise, std 1, 10, 100
  ko            knocked-out class: the window is drawn from the test images of all classes but one (a random class per draw)
  brightness    +40 on every pixel
  rotation      each image rotated by a random angle in [-40, 40] degrees
  blur          gaussian blur, sigma 1 pixel
n in {10, 20, 50, 100, 200, 500, 1000}, --draws random windows per cell (default 50). The features of every shifted
test image are computed once; each draw samples rows of those feature arrays, so a check costs only the tests.
Every draw runs cvops.monitoring.drift.run_drift_tests with backend cvops and, unless --no-alibi, alibi on the same window;
decisions are compared draw by draw.

The model: the deployed version (central_storage/deployments/current.json) with its detectors/ and ref_data/ when
it has them; a deployed version without them gets UAE/BBSD built here by cvops.monitoring.drift_detectors (monitor section of the
config) and a reference drawn as the pipeline draws it; with nothing deployed, the config's model trained briefly
(cvops.testing.train_small_model). The source is recorded in the results.

    python bench/drift_quality.py [--draws 50] [--permutations 100] [--no-alibi] [--out bench/results/drift_quality.json]

Then the notebook notebooks/bench/drift_quality.ipynb is executed by papermill on the results (table + plot), kept as
bench/results/drift_quality.ipynb and .html, and the plot as bench/results/drift_quality.png.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from cvops.cpu import use_cpu_kernels  # noqa: E402

use_cpu_kernels()   # before numpy loads OpenBLAS, as the `cvops` command does
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = (10, 20, 50, 100, 200, 500, 1000)
SHIFTS = ("none", "gn1", "gn10", "gn100", "ko", "brightness", "rotation", "blur")
PAPER = {"source": "Rabanser et al. 2019, BBSD + univariate KS (Bonferroni), MNIST, as quoted in issue 7",
         "test": "ks_bbsd_bonferroni", "rates": {"gn100": {"200": 0.67, "1000": 0.87}, "gn10": {"200": 0.13}},
         "note": "the paper applies each shift to a fraction (10/50/100%) of the window and aggregates; here every image is shifted"}
REFERENCE_SYSTEM = {"ks_bbsd_bonferroni gn10 n=200": 0.44, "chi2_predicted ko n=200": 0.74, "uae fpr": 0.68}


def shift_images(x: np.ndarray, kind: str, rng) -> np.ndarray:
    "uint8 images (n, h, w, c) -> shifted uint8 images."
    from scipy import ndimage
    x = x.astype(np.float32)
    if kind.startswith("gn"): x = x + rng.normal(0, float(kind[2:]), x.shape)
    elif kind == "brightness": x = x + 40
    elif kind == "rotation": x = np.stack([ndimage.rotate(im, rng.uniform(-40, 40), reshape=False, order=1, mode="constant") for im in x])
    elif kind == "blur": x = np.stack([ndimage.gaussian_filter(im, (1.0, 1.0, 0)) for im in x])
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def load_setup(config_path: Path, storage: Path) -> dict:
    "Model, detectors, reference frame, test images: the deployed version's where possible."
    import keras
    import pandas as pd
    from cvops.config import load_config
    from cvops.data.preprocess import load_annotations, load_split
    from cvops.monitoring.drift_detectors import build_bbsd, build_uae, reference_data
    from cvops.registry.versions import current_deployment, detector_path, ref_data_path, resolve_version, version_metadata
    cfg = load_config(config_path)
    mon = cfg.monitor
    rec = current_deployment(storage) if storage.exists() else None
    ds_dir = Path(cfg.dataset.path) if Path(cfg.dataset.path).is_absolute() else ROOT / cfg.dataset.path
    if rec is None:
        return trained_setup(cfg)
    version, folder = resolve_version(storage, rec["model_name"], rec["version"])
    meta = version_metadata(folder)
    from cvops.training.model import load_keras_model, read_model_info
    m = meta["model"]; classes = list(m.get("classes") or read_model_info(folder)["classes"])
    size, ch = (m["input_size"]["w"], m["input_size"]["h"]), m["channels"]
    model = load_keras_model(folder)
    df, classes = load_annotations(ds_dir, cfg.dataset.annotation_file, classes)
    xt, yt = load_split(df, ds_dir, "test", classes, size, ch)
    name = m["model_name"]
    if detector_path(folder, name, "uae").exists() and ref_data_path(folder, name).exists():
        dets = {k: keras.models.load_model(detector_path(folder, name, k), compile=False) for k in ("uae", "bbsd")}
        ref = pd.read_parquet(ref_data_path(folder, name)); source = "deployed version with its published detectors and reference data"
    else:
        dets = {"uae": build_uae((size[1], size[0], ch), mon.encoding_dim, mon.seed), "bbsd": build_bbsd(model, mon.bbsd_layer)}
        xr, yr = load_split(df, ds_dir, mon.reference_split, classes, size, ch, max_images=mon.reference_size, seed=mon.seed)
        ref = reference_data(dets, xr, np.asarray(classes)[yr.argmax(1)], classes)
        source = ("deployed version (no published detectors/reference data): UAE/BBSD built here by cvops.monitoring.drift_detectors, "
                  f"reference = {len(ref)} {mon.reference_split} images")
    return dict(cfg=cfg, classes=classes, dets=dets, ref=ref, x_test=xt, y_test=yt.argmax(1), source=source,
                model=dict(name=name, version=version, accuracy=meta.get("metrics", {}).get("accuracy")))


def trained_setup(cfg) -> dict:
    "Nothing deployed: the config's model trained briefly on Fashion-MNIST arrays (cvops.testing.train_small_model)."
    import tempfile
    import keras
    from cvops.data.dataset import load_default_source
    from cvops.monitoring.drift_detectors import build_detectors, reference_data
    from cvops.testing import train_small_model
    src = load_default_source()
    trained = train_small_model(tempfile.mkdtemp(prefix="cvops-drift-quality-"), 0, 5000, 3, cfg.model, src, n_test=2000)
    model = keras.models.load_model(trained.folder / "model.keras", compile=False)
    dets = build_detectors(model, cfg.monitor)
    n_ref = cfg.monitor.reference_size
    ref = reference_data(dets, src.train[0][-n_ref:, ..., None], np.asarray(src.classes)[src.train[1][-n_ref:]], src.classes)
    return dict(cfg=cfg, classes=list(src.classes), dets=dets, ref=ref, x_test=trained.images[..., None], y_test=trained.labels,
                source="nothing deployed: model trained here (5000 images, 3 epochs)",
                model=dict(name=cfg.model.model_name, version=None, accuracy=trained.accuracy))


def shifted_features(setup: dict, seed: int) -> dict:
    "Features of every test image under every shift (computed once)."
    from cvops.monitoring.drift_detectors import reference_data
    out = {}
    for k, kind in enumerate(SHIFTS):
        x = setup["x_test"] if kind in ("none", "ko") else shift_images(setup["x_test"], kind, np.random.default_rng(seed + k))
        out[kind] = reference_data(setup["dets"], x, None, setup["classes"])
    acc = {kind: float((f["predicted"].to_numpy() == np.asarray(setup["classes"])[setup["y_test"]]).mean()) for kind, f in out.items()}
    return out, acc


def main():
    from cvops.quiet import quiet_tensorflow
    quiet_tensorflow()   # TensorFlow's start-up lines (CUDA factories, cuInit) stay out of the bench's output
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/config.yaml"))
    ap.add_argument("--storage", default=os.environ.get("CVOPS_CENTRAL_STORAGE", str(ROOT / "central_storage")))
    ap.add_argument("--draws", type=int, default=50)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--permutations", type=int, default=100, help="permutations of the MMD / Monte Carlo chi-square (p resolution 1/101 at alpha 0.05)")
    ap.add_argument("--no-alibi", action="store_true")
    ap.add_argument("--alibi-draws", type=int, default=10, help="draws per cell run through alibi too (its MMDDrift costs seconds a call)")
    ap.add_argument("--alibi-sizes", default="20,200", help="window sizes run through alibi too")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/drift_quality.json"))
    ap.add_argument("--no-notebook", action="store_true", help="skip rendering notebooks/bench/drift_quality.ipynb")
    a = ap.parse_args()
    from cvops.monitoring.drift import TESTS, run_drift_tests
    t_start = time.time()
    setup = load_setup(Path(a.config), Path(a.storage))
    sizes = [int(s) for s in a.sizes.split(",")]
    # every n is tested: min_rows (the monitor policy: no verdict below monitor.min_rows rows) is lowered to the smallest window;
    # the tests are valid at any n (exact KS, permutation MMD, Monte Carlo chi-square, exact Mann-Whitney)
    mon = setup["cfg"].monitor.model_copy(update={"permutations": a.permutations, "min_rows": max(2, min(sizes))})
    feats, acc = shifted_features(setup, a.seed)
    print(f"model: {setup['model']} ({setup['source']}); test accuracy per shift: {acc}", flush=True)
    backends = ["cvops"] + ([] if a.no_alibi else ["alibi"])
    alibi_sizes = [int(s) for s in a.alibi_sizes.split(",")]
    rng = np.random.default_rng(a.seed)
    y, classes = setup["y_test"], setup["classes"]
    raw = []   # one row per (shift, n, draw, backend, test)
    for kind in SHIFTS:
        t_shift = time.time()
        for n in sizes:
            for d in range(a.draws):
                ko = None
                if kind == "ko":
                    ko = int(rng.integers(len(classes))); pool = np.flatnonzero(y != ko)
                else: pool = np.arange(len(y))
                idx = rng.choice(pool, min(n, len(pool)), replace=False)
                cur = feats[kind].iloc[idx].reset_index(drop=True)
                seed = int(rng.integers(2**31))
                for b in backends:
                    if b == "alibi" and (d >= a.alibi_draws or n not in alibi_sizes): continue
                    for r in run_drift_tests(setup["ref"], cur, classes, mon.model_copy(update={"backend": b}), seed=seed):
                        raw.append(dict(shift=kind, n=n, draw=d, backend=b, test=r["test"], p=r["p_value"], drift=r["verdict"] == "drift",
                                        seconds=r["details"].get("seconds"), ko_class=ko))
        print(f"  {kind}: {time.time() - t_shift:.0f} s", flush=True)
    import pandas as pd
    df = pd.DataFrame(raw)
    rates = df.groupby(["backend", "test", "shift", "n"]).drift.mean()
    secs = df.groupby(["backend", "test", "n"]).seconds.median()
    piv = df.pivot_table(index=["shift", "n", "draw", "test"], columns="backend", values="drift").dropna()
    disagree = (piv["cvops"] != piv["alibi"]).groupby(["test", "shift", "n"]).mean() if "alibi" in piv else None
    ko_rates = df[df["shift"] == "ko"].groupby(["backend", "test", "ko_class"]).drift.mean()

    def to_dict(series):
        out = {}
        for idx, v in series.items():
            d = out
            for k in idx[:-1]: d = d.setdefault(str(k), {})
            d[str(idx[-1])] = None if pd.isna(v) else round(float(v), 4)
        return out
    fpr_max = {b: {t: float(df[(df["shift"] == "none") & (df.backend == b) & (df.test == t)].groupby("n").drift.mean().max()) for t in TESTS} for b in backends}
    r = lambda test, shift, n, b="cvops": float(rates.get((b, test, shift, n), np.nan))
    best = lambda shift, n, b="cvops": max(((r(t, shift, n, b), t) for t in TESTS if fpr_max[b][t] <= 0.10), default=(np.nan, None))
    targets = {
        "fpr <= 0.10 for every test at every n": {b: {"max_fpr": fpr_max[b], "met": all(v <= 0.10 for v in fpr_max[b].values())} for b in backends},
        "gn10 at n=200 >= 0.6 (best sound test)": dict(zip(("rate", "test"), best("gn10", 200))),
        "ko at n=200 >= 0.8 (best sound test)": dict(zip(("rate", "test"), best("ko", 200))),
        "gn100 >= 0.9 from n=20 (best sound test)": {str(n): dict(zip(("rate", "test"), best("gn100", n))) for n in sizes if n >= 20},
    }
    targets["gn10 at n=200 >= 0.6 (best sound test)"]["met"] = targets["gn10 at n=200 >= 0.6 (best sound test)"]["rate"] >= 0.6
    targets["ko at n=200 >= 0.8 (best sound test)"]["met"] = targets["ko at n=200 >= 0.8 (best sound test)"]["rate"] >= 0.8
    g = targets["gn100 >= 0.9 from n=20 (best sound test)"]; g["met"] = all(v["rate"] >= 0.9 for v in g.values())
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": setup["model"], "features_source": setup["source"], "n_reference": len(setup["ref"]), "n_test_images": int(len(y)),
        "test_accuracy_per_shift": acc, "draws": a.draws, "alibi_draws": 0 if a.no_alibi else a.alibi_draws, "alibi_sizes": [] if a.no_alibi else alibi_sizes, "sizes": sizes, "shifts": list(SHIFTS), "tests": list(TESTS), "backends": backends,
        "alpha": mon.alpha, "min_rows": mon.min_rows, "min_rows_config": setup["cfg"].monitor.min_rows, "permutations": a.permutations, "max_test_rows": mon.max_test_rows,
        "detection_rate": to_dict(rates), "median_seconds_per_test": to_dict(secs),
        "decisions_differ": None if disagree is None else to_dict(disagree),
        "ko_rate_by_class": {b: {t: {classes[int(c)]: round(float(v), 3) for c, v in ko_rates.xs((b, t)).items()} for t in TESTS} for b in backends},
        "paper": PAPER, "reference_system_here": REFERENCE_SYSTEM, "targets": targets, "seconds_total": round(time.time() - t_start, 1),
    }
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps(targets, indent=1, default=float))
    print(f"wrote {out} ({result['seconds_total']:.0f} s)")
    if not a.no_notebook:
        nb = out.with_suffix(".ipynb")
        subprocess.run([str(Path(sys.executable).parent / "papermill"), str(ROOT / "notebooks/bench/drift_quality.ipynb"), str(nb),
                        "-p", "results_path", str(out), "-p", "png_path", str(out.with_suffix(".png")), "--log-level", "ERROR"], check=True)
        subprocess.run([str(Path(sys.executable).parent / "jupyter"), "nbconvert", "--to", "html", "--no-input", str(nb), "--log-level", "ERROR"], check=True)
        print(f"rendered {nb} and {nb.with_suffix('.html')}")


if __name__ == "__main__":
    main()
