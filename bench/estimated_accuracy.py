"""Accuracy before labels: the monitor's estimated accuracy (CBPE with the version's calibration) against the true accuracy,
on the drift benchmark's shifts and on a shift that changes what the labels mean.

The model: the deployed version in central_storage/ with its published calibration.json (a version without one is calibrated
here as the evaluate task calibrates: temperature fitted on the dataset's validation split, kept only where it lowers the ECE
on the test split); with nothing deployed, the config's model section trained here briefly (cvops.testing.train_small_model on
--train-images Fashion-MNIST training images) and calibrated the same way on held-out images (the rest of the train file for
the fit, the first --check-images t10k images for the ECE). The source is recorded in the results.

The windows' images: the dataset's test split (deployed) or t10k images the calibration never saw (trained here), --pool of
them per shift, shifted as bench/drift_quality.py shifts them (its SHIFTS and shift_images, imported):
  none, gn1/gn10/gn100 (gaussian noise), ko (windows without one class, a random class per window), brightness, rotation, blur
  label_swap   the images unchanged, the labels of two classes (--swap, default T-shirt/top and Shirt) swapped: a change of
               what the labels mean (concept shift). The model's confidence cannot see it: the estimate is known to fail here.
Every image goes through the code the service runs (cvops.serving.inference: PNG bytes, check_upload, prepare_batch, the
version's compiled call), its probabilities are rounded and written as the service logs them (class_probabilities, 6 decimals,
JSON), and the monitor's own code reads them back and estimates (cvops.monitoring.estimate.window_estimate: the parser of the
logged probabilities, the calibration, the +-2 SE band). (Where a window's rows all logged BBSD features that are the softmax, the
monitor reads those float32 values instead of parsing the JSON; the estimate from them is recorded per pool beside, to show the
two agree.) For each shift and window size n (--sizes), --windows random windows:
the true accuracy (labels known), the estimate, |estimate - true|; per cell the mean absolute error (MAE), the bias, the share
of windows whose true accuracy lies in the band (coverage), and the MAE of the uncalibrated estimate (T = 1) beside it.

    python bench/estimated_accuracy.py [--windows 50] [--sizes 200,1000] [--pool 2000] [--out bench/results/estimated_accuracy.json]
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from cvops.cpu import use_cpu_kernels  # noqa: E402

use_cpu_kernels()   # before numpy loads OpenBLAS, as the `cvops` command does
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from drift_quality import SHIFTS, shift_images     # noqa: E402  the drift benchmark's shifts
from drift_e2e import split_source_indices         # noqa: E402  which Fashion-MNIST images are in which split of the dataset

CONCEPT = "label_swap"


def serve_probabilities(lv, images: np.ndarray, batch: int = 256) -> np.ndarray:
    "uint8 images (n, h, w) -> the probabilities as the service computes them: PNG upload, check_upload, prepare_batch, the compiled call."
    from cvops.serving.inference import check_upload, prepare_batch
    from cvops.testing import encode
    out = []
    for i in range(0, len(images), batch):
        ups = [check_upload(encode(im), "image/png") for im in images[i:i + batch]]
        out.append(lv(prepare_batch(ups, lv), heatmap=False)["probs"])
    return np.concatenate(out)


def logged_texts(probs: np.ndarray, classes: list) -> list:
    "The `probabilities` column as the service writes it: class_probabilities (6 decimals), JSON-encoded as the log stores it."
    from cvops.serving.inference import class_probabilities
    return [json.dumps(class_probabilities(p, classes)) for p in probs]


def setup_model(work: Path, storage: Path, config_path: Path, train_images: int, epochs: int, check_images: int) -> dict:
    "The version to measure (loaded as the service loads it), its calibration, and the images + labels the windows draw from."
    from cvops.config import load_config
    from cvops.data.dataset import load_default_source
    from cvops.registry.versions import current_deployment, resolve_version, version_metadata
    from cvops.serving.inference import load_version
    from cvops.training.calibration import fit_calibration, read_calibration
    src = load_default_source()
    rec = current_deployment(storage) if storage.exists() else None
    if rec is not None:
        version, folder = resolve_version(storage, rec["model_name"], rec["version"])
        lv = load_version(folder, version_metadata(folder))
        if list(lv.classes) != list(src.classes):
            raise RuntimeError(f"the deployed version's classes {lv.classes} are not Fashion-MNIST's: this bench needs the default dataset's model")
        si = split_source_indices(src)
        pool_x, pool_y = src.test[0][si["test"]], src.test[1][si["test"]]
        cal = read_calibration(folder)
        if cal is not None: how = "published with the version (calibration.json)"
        else:
            vx, vy = src.train[0][si["valid"]], src.train[1][si["valid"]]
            cal = fit_calibration(serve_probabilities(lv, vx), vy, serve_probabilities(lv, pool_x), pool_y, "valid", "test")
            how = "the version has no calibration.json: fitted here as the evaluate task fits it (valid split; ECE on the test split)"
        return dict(lv=lv, version=version, source=f"the deployed version {version}", calibration=cal, calibration_source=how,
                    pool_x=pool_x, pool_y=pool_y, pool_from="the dataset's test split")
    cfg = load_config(config_path)
    from cvops.testing import train_small_model
    print(f"nothing deployed in {storage}: training the config's model ({cfg.model.model_name}) on {train_images} images, "
          f"{epochs} epochs", flush=True)
    t0 = time.time()
    trained = train_small_model(work, 0, train_images, epochs, cfg.model, src, n_test=check_images)
    lv = load_version(trained.folder, {"version": f"{cfg.model.model_name}@bench"})
    fx, fy = src.train[0][train_images:train_images + 3000], src.train[1][train_images:train_images + 3000]   # never trained on
    cx, cy = src.test[0][:check_images], src.test[1][:check_images]
    cal = fit_calibration(serve_probabilities(lv, fx), fy, serve_probabilities(lv, cx), cy,
                          f"train file [{train_images}:{train_images + 3000}] (held out)", f"t10k [:{check_images}]")
    return dict(lv=lv, version=lv.version, calibration=cal,
                source=f"nothing deployed: the config's model trained here ({train_images} images, {epochs} epochs, {time.time() - t0:.0f} s; "
                       f"accuracy {trained.accuracy:.3f} on t10k[:{check_images}])",
                calibration_source="fitted here as the evaluate task fits it, on held-out images", pool_x=src.test[0][check_images:],
                pool_y=src.test[1][check_images:], pool_from=f"t10k [{check_images}:] (neither trained nor calibrated on)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/config.yaml"))
    ap.add_argument("--storage", default=os.environ.get("CVOPS_CENTRAL_STORAGE", str(ROOT / "central_storage")))
    ap.add_argument("--windows", type=int, default=50, help="random windows per (shift, n)")
    ap.add_argument("--sizes", default="200,1000")
    ap.add_argument("--pool", type=int, default=2000, help="images per shift the windows are drawn from")
    ap.add_argument("--swap", default="T-shirt_top,Shirt", help="the two classes whose labels label_swap exchanges")
    ap.add_argument("--train-images", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--check-images", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/estimated_accuracy.json"))
    a = ap.parse_args(argv)
    t_start = time.time()
    from cvops.quiet import quiet_tensorflow
    quiet_tensorflow()
    import pandas as pd
    from cvops.monitoring.estimate import window_estimate
    work = Path(tempfile.mkdtemp(prefix="cvops-bench-estimate-"))
    s = setup_model(work, Path(a.storage), Path(a.config), a.train_images, a.epochs, a.check_images)
    lv, cal, classes = s["lv"], s["calibration"], list(s["lv"].classes)
    print(f"model: {s['source']}; calibration: {cal['method']} T={cal['temperature']:.4g} (fitted {cal.get('fitted_temperature', 1.0):.4g}; "
          f"ECE {cal.get('ece_before', float('nan')):.4f} -> {cal.get('ece_after', float('nan')):.4f}; {s['calibration_source']})", flush=True)
    swap = [classes.index(c) for c in a.swap.split(",") if c in classes]
    if len(swap) != 2: raise SystemExit(f"--swap {a.swap}: two of the model's classes are needed ({', '.join(classes)})")
    rng = np.random.default_rng(a.seed)
    idx = rng.choice(len(s["pool_y"]), min(a.pool, len(s["pool_y"])), replace=False)
    x0, y0 = s["pool_x"][idx], s["pool_y"][idx]
    sizes = [int(n) for n in a.sizes.split(",")]
    shifts = list(SHIFTS) + [CONCEPT]
    cells, pools, t_infer = [], {}, 0.0
    for k, kind in enumerate(shifts):
        x = x0 if kind in ("none", "ko", CONCEPT) else shift_images(x0[..., None], kind, np.random.default_rng(a.seed + k))[..., 0]
        y = y0.copy()
        if kind == CONCEPT: y[y0 == swap[0]], y[y0 == swap[1]] = swap[1], swap[0]       # what the two labels mean is exchanged
        t = time.time(); probs = serve_probabilities(lv, x); t_infer += time.time() - t
        texts = pd.Series(logged_texts(probs, classes))
        right = probs.argmax(1) == y
        whole = {T: window_estimate(pd.DataFrame({"probabilities": texts}), classes, {lv.version: c}) for T, c in (("cal", cal), ("raw", None))}
        f32 = window_estimate(pd.DataFrame({"probabilities": texts}), classes, {lv.version: cal}, probabilities=probs)   # the BBSD shortcut's numbers
        pools[kind] = dict(images=len(y), true_accuracy=float(right.mean()), estimate=whole["cal"]["estimated_accuracy"],
                           estimate_from_float32=f32["estimated_accuracy"],
                           estimate_uncalibrated=whole["raw"]["estimated_accuracy"],
                           error=whole["cal"]["estimated_accuracy"] - float(right.mean()))
        for n in sizes:
            rows = []
            for w in range(a.windows):
                pool = np.flatnonzero(y0 != int(rng.integers(len(classes)))) if kind == "ko" else np.arange(len(y))
                sel = rng.choice(pool, min(n, len(pool)), replace=False)
                win = pd.DataFrame({"probabilities": texts.iloc[sel].to_numpy()})
                e = window_estimate(win, classes, {lv.version: cal})
                u = window_estimate(win, classes, {lv.version: None})
                true = float(right[sel].mean())
                rows.append(dict(true=true, est=e["estimated_accuracy"], low=e["estimated_low"], high=e["estimated_high"],
                                 raw=u["estimated_accuracy"]))
            df = pd.DataFrame(rows)
            err = df.est - df.true
            cells.append(dict(shift=kind, n=n, windows=len(df), true_accuracy=float(df.true.mean()), estimate=float(df.est.mean()),
                              mae=float(err.abs().mean()), bias=float(err.mean()), max_abs_error=float(err.abs().max()),
                              coverage=float(((df.true >= df.low) & (df.true <= df.high)).mean()),
                              band_half_width=float(((df.high - df.low) / 2).mean()),
                              mae_uncalibrated=float((df.raw - df.true).abs().mean())))
        c = [c for c in cells if c["shift"] == kind]
        print(f"  {kind:<11} true {pools[kind]['true_accuracy']:.3f} estimate {pools[kind]['estimate']:.3f} (uncalibrated "
              f"{pools[kind]['estimate_uncalibrated']:.3f}); MAE " + ", ".join(f"n={x['n']} {x['mae']:.4f} (coverage {x['coverage']:.2f})" for x in c),
              flush=True)
    per_shift = {}
    for kind in shifts:
        c = {str(x["n"]): x for x in cells if x["shift"] == kind}
        per_shift[kind] = dict(mae={n: round(v["mae"], 4) for n, v in c.items()}, bias={n: round(v["bias"], 4) for n, v in c.items()},
                               coverage={n: round(v["coverage"], 3) for n, v in c.items()},
                               mae_uncalibrated={n: round(v["mae_uncalibrated"], 4) for n, v in c.items()},
                               whole_pool_error=round(pools[kind]["error"], 4), known_failure=kind == CONCEPT)
    concept = per_shift[CONCEPT]
    est_moved = pools[CONCEPT]["estimate"] - pools["none"]["estimate"]          # the same images: the estimate cannot move
    true_moved = pools[CONCEPT]["true_accuracy"] - pools["none"]["true_accuracy"]
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": {"version": s["version"], "source": s["source"]}, "calibration": cal, "calibration_source": s["calibration_source"],
        "estimator": "cvops.monitoring.estimate.window_estimate: mean calibrated top-class probability; band +-2 SE (Poisson-binomial)",
        "probabilities": "computed by cvops.serving.inference (PNG upload, check_upload, prepare_batch, the compiled call), rounded and "
                         "JSON-encoded as the service logs them (class_probabilities, 6 decimals), parsed by the monitor's reader",
        "pool": {"images_per_shift": int(len(y0)), "from": s["pool_from"]}, "sizes": sizes, "windows": a.windows,
        "shifts": shifts, "label_swap": [classes[i] for i in swap],
        "error_per_shift": per_shift, "cells": cells, "whole_pool": pools,
        "known_failure": {"shift": CONCEPT, "what": f"the labels of {classes[swap[0]]} and {classes[swap[1]]} exchanged: the images and so "
                          "the model's confidences are unchanged, the true accuracy drops; the estimate cannot see it",
                          "mae": concept["mae"], "estimate_moved": est_moved, "true_accuracy_moved": true_moved,
                          "fails_as_expected": bool(abs(est_moved) < 1e-9 and true_moved < 0)},
        "inference_seconds": round(t_infer, 1), "seconds_total": round(time.time() - t_start, 1),
    }
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}"); tmp.write_text(json.dumps(result, indent=1, default=float)); os.replace(tmp, out)
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')} ({result['seconds_total']:.0f} s)")


def markdown(r: dict) -> str:
    cal = r["calibration"]
    lines = [f"# Estimated accuracy vs true accuracy ({r['created']})", "",
             f"Model: {r['model']['source']}. Calibration: {cal['method']}, T = {cal['temperature']:.4g} (fitted {cal.get('fitted_temperature', 1.0):.4g}; "
             f"ECE {cal.get('ece_before', float('nan')):.4f} -> {cal.get('ece_after', float('nan')):.4f}); {r['calibration_source']}. "
             f"{r['pool']['images_per_shift']} images per shift from {r['pool']['from']}; {r['windows']} random windows per cell. "
             f"Probabilities {r['probabilities']}.", "",
             "MAE = mean |estimate - true accuracy| over the windows; bias = mean (estimate - true); coverage = share of windows whose true "
             "accuracy lies in the +-2 SE band; uncal. = the MAE of the uncalibrated estimate (T = 1).", "",
             "| shift | true acc. (pool) | estimate (pool) | " + " | ".join(f"MAE n={n} | bias n={n} | coverage n={n} | uncal. n={n}" for n in r["sizes"]) + " |",
             "|---|---|---|" + "---|" * (4 * len(r["sizes"]))]
    for kind in r["shifts"]:
        p, e = r["whole_pool"][kind], r["error_per_shift"][kind]
        name = f"{kind} (known failure)" if e["known_failure"] else kind
        lines.append(f"| {name} | {p['true_accuracy']:.3f} | {p['estimate']:.3f} | " + " | ".join(
            f"{e['mae'][str(n)]:.4f} | {e['bias'][str(n)]:+.4f} | {e['coverage'][str(n)]:.2f} | {e['mae_uncalibrated'][str(n)]:.4f}" for n in r["sizes"]) + " |")
    d = max(abs(p["estimate_from_float32"] - p["estimate"]) for p in r["whole_pool"].values())
    lines += ["", f"The estimate from the float32 probabilities (what the monitor reads when the window's BBSD features are the softmax) "
              f"differs from the one from the logged 6-decimal JSON by at most {d:.1e} over the pools."]
    kf = r["known_failure"]
    lines += ["", f"Known failure, {kf['shift']}: {kf['what']}: against no shift the true accuracy moved by {kf['true_accuracy_moved']:+.3f}, "
              f"the estimate by {kf['estimate_moved']:+.3f}; MAE " + ", ".join(f"n={n} {v:.3f}" for n, v in kf["mae"].items())
              + (" -- as expected." if kf["fails_as_expected"] else " -- NOT what was expected (check the swap).")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
