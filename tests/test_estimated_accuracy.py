"""Accuracy before labels, end to end: a small Fashion-MNIST model published with a calibration.json and deployed; the real service (`cvops serve`, 2 workers) on a free port; 150 other test images
POSTed over HTTP, the true label of every third sent as feedback right after its answer; then `cvops monitor` in the project
folder. Its `live_accuracy` row must carry the estimate (the mean top-class probability of the logged probabilities after the
published temperature), its +-2 SE band, the live accuracy of the 50 labels and their median delay; the numbers are recomputed
here from the prediction log and the version folder, and the CLI's summary and the run's rendered notebook must show them.

The published temperature is 1.5, not fitted: this small model is calibrated as it is (its fitted T is about 1.01, which would
leave the estimate where T = 1 puts it), and what is checked here is that the monitor applies whatever the version publishes;
fitting it is checked in notebooks/lib/training/05_calibration.ipynb and by the pipeline test. The version is published without drift detectors (not needed for the estimate; the feature tests then say "insufficient
data", which the monitor reports and does not fail on)."""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from cvops.testing import Service, Webhook, encode, monitor_env, monitor_project, publish_version, run_monitor, wait_predictions_logged

pytestmark = [pytest.mark.service, pytest.mark.e2e]

N_WINDOW, FEEDBACK_EVERY = 150, 3
MONITOR = {"window_days": 1, "window_rows": N_WINDOW, "min_rows": 30, "alpha": 0.01, "permutations": 100, "seed": 0}


def test_monitor_writes_and_prints_the_estimated_accuracy_of_a_served_window(tmp_path, trained_models):
    import sqlalchemy as sa
    from cvops.data.dataset import load_default_source
    from cvops.predlog.schema import predictions
    from cvops.registry.versions import resolve_version
    from cvops.settings import default_db_url
    from cvops.training.calibration import apply_temperature, read_calibration, write_calibration

    trained = trained_models["a"]                                   # trained on train[:3000], scored on test[:500]
    images, labels = load_default_source().test
    T = 1.5
    cal_file = write_calibration(tmp_path / "calibration.json", {"method": "temperature", "temperature": T, "fitted_on": "set by the test"})
    root = monitor_project(tmp_path / "project", MONITOR)
    storage = root / "central_storage"
    version = publish_version(storage, trained.folder, trained.name, trained.accuracy, {"calibration.json": cal_file}, trained.classes,
                              deploy=True)
    classes = trained.classes
    hook = Webhook()
    svc = Service(root, workers=2)
    try:
        svc.start()
        svc.wait_workers_ready(version)
        x, y = images[2000:2000 + N_WINDOW], labels[2000:2000 + N_WINDOW]
        t0 = time.time()

        def one(i):
            r = svc.predict(encode(x[i]), heatmap=False)
            assert r.status_code == 200, r.text
            d = r.json()
            if i % FEEDBACK_EVERY == 0:
                f = requests.post(svc.url("/feedback"), json={"request_id": d["request_id"], "labels": [classes[y[i]]]}, timeout=30)
                assert f.status_code == 200, f.text
                return d, f.json()["correct"]
            return d, None
        with ThreadPoolExecutor(4) as ex:
            answers = list(ex.map(one, range(N_WINDOW)))
        sent_s = time.time() - t0
        wait_predictions_logged(default_db_url(root), N_WINDOW)
        out, rows = run_monitor(root, monitor_env(root, hook.url))
    finally:
        svc.stop()
        hook.close()

    acc = next(r for r in rows if r["test"] == "live_accuracy")
    est, low, high = acc["estimated_accuracy"], acc["estimated_low"], acc["estimated_high"]
    assert est is not None and low < est < high, acc
    assert all(r["estimated_accuracy"] is None for r in rows if r["test"] != "live_accuracy")
    # recomputed from what the service logged and what the version published
    eng = sa.create_engine(default_db_url(root))
    try:
        with eng.connect() as c:
            logged = [r[0] for r in c.execute(sa.select(predictions.c.probabilities).where(predictions.c.model_version == version))]
    finally:
        eng.dispose()
    logged = [json.loads(p) if isinstance(p, str) else p for p in logged]
    assert len(logged) == N_WINDOW
    probs = np.array([[p[c] for c in classes] for p in logged])
    _, folder = resolve_version(storage, trained.name, version)
    assert read_calibration(folder)["temperature"] == pytest.approx(T)
    conf = apply_temperature(probs, T).max(1)
    assert est == pytest.approx(conf.mean(), abs=1e-9)
    assert high - est == pytest.approx(2 * np.sqrt((conf * (1 - conf)).sum()) / N_WINDOW, abs=1e-9)
    assert probs.max(1).mean() - est > 0.01                           # the temperature lowered the estimate
    true = float(np.mean([a["top_class"] == classes[y[i]] for i, (a, _) in enumerate(answers)]))
    assert abs(probs.max(1).mean() - true) < 0.1, (probs.max(1).mean(), true)   # this model's own confidence: near the truth
    # live accuracy and the labels' delay, beside it
    correct = [ok for _, ok in answers if ok is not None]
    assert acc["n_rows"] == len(correct) == N_WINDOW // FEEDBACK_EVERY
    assert acc["statistic"] == pytest.approx(np.mean(correct))
    assert 0 < acc["label_delay_s"] < sent_s, acc["label_delay_s"]
    details = acc["details"] if isinstance(acc["details"], dict) else json.loads(acc["details"])
    assert details["estimate"]["calibration"][version] == {"method": "temperature", "temperature": pytest.approx(T)}
    assert details["estimate"]["n_estimated"] == N_WINDOW and details["estimate"]["label_delay"]["n"] == len(correct)
    # the CLI's summary and the run's rendered notebook show them
    assert f"estimated accuracy {est:.4f} (band {low:.4f}..{high:.4f}, +-2 SE, {N_WINDOW} predictions; {version}: temperature T={T:.3g})" in out, out
    assert f"live accuracy {np.mean(correct):.4f} from {len(correct)} labels, median label delay" in out, out
    print(next(line for line in out.splitlines() if "estimated accuracy" in line), f"| true accuracy of the window {true:.4f}")
    run_id = out.split("monitor run ", 1)[1].split(":", 1)[0]
    html = (root / "products" / "monitor" / run_id / "check_drift.html").read_text()
    assert "Accuracy before labels" in html and f"{est:.4f}" in html
