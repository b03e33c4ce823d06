"""Drift tests that hold on the real path, with a model as confident as the default one.

A small CNN trained on 30,000 Fashion-MNIST training images for 6 epochs (about a minute on 2
cores; held-out accuracy ~0.90, median top probability ~0.997, median smallest probability
~1e-10: softmax tails of 1e-9 .. 1e-15 like the default model's) is published WITH its
detectors and reference data built by the pipeline's own functions (`build_detectors`,
`make_reference` over image files on disk, `save_detectors`), deployed, and served by the real
service (`cvops serve`, 2 workers) on a free port. Then, over HTTP:

(a) reference images themselves (their files' bytes) -> the logged features, read back with the
    monitor's reader (`read_window` + `window_frame`), equal the reference rows (float32
    tolerance; the softmax tails relative, so 6-decimal rounding would fail it);
(b) three windows of unshifted held-out test images (not in the reference, never trained on)
    -> no run-level alert (`cvops monitor` for the first, `check_drift` in-process for the
    others), the webhook is not called;
(c) a window of the same kind of images with gaussian noise (std 100 on 0-255) -> one
    run-level alert (`cvops monitor`), one webhook call leading with the run's verdict.

False alarms: alpha = 0.01 here, Holm-corrected over the four feature tests, so each unshifted
window alerts with probability at most 1% (3 windows: at most 3%); the draw is seeded
(training, images, permutations), so the outcome repeats run after run. Before the fix, (b)
failed on every window (KS on BBSD p ~ 1e-100: logged tails rounded to zero).
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

from cvops.testing import (Service, Webhook, detector_version_files, encode, images_dataset, monitor_env, monitor_project,
                           publish_version, run_monitor, train_small_model, wait_predictions_logged)

pytestmark = [pytest.mark.service, pytest.mark.e2e]

N_REF, N_WINDOW, N_POST_REF = 1000, 200, 300
MONITOR = {"window_days": 1, "window_rows": N_WINDOW, "min_rows": 30, "alpha": 0.01, "permutations": 500,
           "max_test_rows": 1000, "reference_size": N_REF, "reference_split": "valid", "seed": 0}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    "The confident model published with detectors + reference data by the real code path, deployed, served."
    import keras
    from cvops.data.dataset import load_default_source
    from cvops.monitoring.drift_detectors import build_detectors, make_reference
    base = tmp_path_factory.mktemp("drift-real-path")
    root = monitor_project(base / "project", MONITOR)
    trained = train_small_model(base, seed=0, n_train=30000, epochs=6)
    model = keras.models.load_model(trained.folder / "model.keras", compile=False)
    src = load_default_source()
    classes = list(src.classes)
    images, labels = src.test
    held = np.arange(N_REF, 4000)                                    # held-out: never trained on, not in the reference
    p = np.asarray(model(images[held][..., None].astype("float32") / 255))
    stats = {"accuracy": float((p.argmax(1) == labels[held]).mean()), "median_max_prob": float(np.median(p.max(1))),
             "median_min_prob": float(np.median(p.min(1)))}
    print(f"model: held-out accuracy {stats['accuracy']:.3f}, median top probability {stats['median_max_prob']:.4f}, "
          f"median smallest probability {stats['median_min_prob']:.2e}")
    # the reference split on disk, as a dataset holds it: test images 0..999 as PNG files + annotation rows
    data = base / "dataset"
    ann = images_dataset(data, images[:N_REF], labels[:N_REF], classes, "valid")
    detectors = build_detectors(model, MONITOR)
    ref = make_reference(detectors, ann, data, classes, (28, 28), 1, MONITOR, model=model)
    files = detector_version_files(detectors, ref, trained.name, base / "extra")
    version = publish_version(root / "central_storage", trained.folder, trained.name, stats["accuracy"], files, classes,
                              len(held), deploy=True)
    hook = Webhook()
    env = monitor_env(root, hook.url)
    svc = Service(root, workers=2)
    try:
        svc.start()
        svc.wait_workers_ready(version)
        yield dict(root=root, svc=svc, env=env, hook=hook, version=version, classes=classes, ref=ref, data=data,
                   images=images, labels=labels, stats=stats, posted=[0])
    finally:
        svc.stop()
        hook.close()


def _post(s, payloads: list, heatmap_every: int = 0) -> list:
    "POST every payload (4 at a time); every `heatmap_every`-th with the heatmap (the GradCAM call), the others without."
    def one(i):
        r = s["svc"].predict(payloads[i], heatmap=bool(heatmap_every) and i % heatmap_every == 0)
        assert r.status_code == 200, r.text
        return r.json()["request_id"]
    with ThreadPoolExecutor(4) as ex:
        ids = list(ex.map(one, range(len(payloads))))
    s["posted"][0] += len(payloads)
    from cvops.settings import default_db_url
    wait_predictions_logged(default_db_url(s["root"]), s["posted"][0])
    return ids


def _logged_frame(s, request_ids: list) -> pd.DataFrame:
    "The logged rows of these requests through the monitor's own reader, in the order of `request_ids`."
    from cvops.monitoring.check_drift import window_frame
    from cvops.predlog.queries import read_window
    from cvops.predlog.schema import make_engine
    from cvops.settings import default_db_url
    eng = make_engine(default_db_url(s["root"]))
    try: rows = read_window(eng, s["version"])
    finally: eng.dispose()
    rows = rows.set_index("request_id").loc[request_ids].reset_index()
    assert rows.feature_blob.notna().all() and rows.features.isna().all()   # float32 blobs, no rounded JSON
    return window_frame(rows)


def test_a_reference_images_through_the_service_log_their_reference_rows(served):
    from cvops.monitoring.drift_detectors import feature_matrix
    s = served
    assert s["stats"]["median_max_prob"] >= 0.99 and s["stats"]["median_min_prob"] <= 1e-8, s["stats"]   # as confident as the default
    ref = s["ref"]
    idx = np.arange(0, N_REF, N_REF // N_POST_REF)[:N_POST_REF]
    ids = _post(s, [(s["data"] / ref.path[i]).read_bytes() for i in idx], heatmap_every=10)
    got = _logged_frame(s, ids)
    for head in ("bbsd", "uae"):
        logged, expected = feature_matrix(got, head), feature_matrix(ref.iloc[idx], head)
        np.testing.assert_allclose(logged, expected, rtol=1e-5, atol=1e-6, err_msg=head)
    # the softmax tails relative to their size (6-decimal rounding would make them 0 and fail here)
    logged, expected = feature_matrix(got, "bbsd"), feature_matrix(ref.iloc[idx], "bbsd")
    assert (expected < 1e-9).mean() > 0.2, "the model's tails are not small: not a confident model"
    np.testing.assert_allclose(logged, expected, rtol=1e-3, atol=0, err_msg="bbsd tails")
    assert got.predicted.tolist() == ref.predicted.iloc[idx].tolist()


def test_b_unshifted_held_out_windows_raise_no_run_level_alert(served):
    from cvops.config import MonitorConfig
    from cvops.monitoring.check_drift import check_drift
    from cvops.settings import MonitorSettings
    from cvops.predlog.schema import make_engine
    from cvops.settings import default_db_url
    s = served
    for k in range(3):
        sl = slice(N_REF + 500 + k * N_WINDOW, N_REF + 500 + (k + 1) * N_WINDOW)    # not in the reference, never trained on
        _post(s, [encode(im) for im in s["images"][sl]])
        if k == 0:
            out, rows = run_monitor(s["root"], s["env"])                              # what `make monitor` runs
            assert "RUN VERDICT: NO DRIFT" in out, out
        else:
            eng = make_engine(default_db_url(s["root"]))                            # the same database, in-process
            try: run = check_drift(s["root"], MonitorConfig(**MONITOR), engine=eng, storage=s["root"] / "central_storage",
                                   settings=MonitorSettings(webhook_url=s["hook"].url))
            finally: eng.dispose()
            rows = run.rows
        by_test = {r["test"]: r for r in rows}
        ra = by_test["run_alert"]
        print(f"unshifted window {k}: " + ", ".join(f"{t} p={r['p_value']:.3g}" for t, r in by_test.items() if r["p_value"] is not None))
        assert ra["verdict"] == "no drift" and ra["n_rows"] == N_WINDOW, rows
        assert all(r["verdict"] != "drift" for r in rows), rows
        assert by_test["ks_bbsd_bonferroni"]["p_value"] > 1e-3, by_test["ks_bbsd_bonferroni"]    # the headline test holds
    assert not s["hook"].received, s["hook"].received


def test_c_a_shifted_window_raises_one_run_level_alert(served):
    s = served
    rng = np.random.default_rng(0)
    sl = slice(N_REF + 2000, N_REF + 2000 + N_WINDOW)
    noisy = np.clip(s["images"][sl] + rng.normal(0, 100, s["images"][sl].shape), 0, 255).astype(np.uint8)
    before = len(s["hook"].received)
    _post(s, [encode(im) for im in noisy])
    out, rows = run_monitor(s["root"], s["env"])
    alerts = [r for r in rows if r["test"] == "run_alert"]
    assert len(alerts) == 1 and alerts[0]["verdict"] == "drift" and alerts[0]["n_rows"] == N_WINDOW, rows
    assert "RUN VERDICT: DRIFT" in out, out
    assert len(s["hook"].received) == before + 1, s["hook"].received
    payload = s["hook"].received[-1]
    assert list(payload)[:2] == ["event", "alert"] and payload["alert"]["verdict"] == "drift", payload
    assert payload["model_version"] == s["version"]
