"""The Voila dashboards (`make dashboard`) against a project with realistic data: a published
and deployed version with detectors and reference data, a prediction log (predictions with
the version's own features, their images in the image store, api_log rows with refusals and
errors), deployments, and the drift reports of three runs of the real monitor over that log
(insufficient data, no drift, drift with live accuracy); for the rollout page, a copy of that
project with a third version (trained differently) in shadow: its outputs for the serving
version's logged requests, computed by the candidate itself from the stored images. Voila is
started on a free port of 127.0.0.1 and stopped by the test; the dashboards are fetched over
HTTP and rendered in headless Chromium."""
import io
import os
import re
import shutil
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import requests
import sqlalchemy as sa

from conftest import check_rendered_html, pngs, text_of
from cvops.testing import encode, headless_chromium, publish_version, tiny_version, train_small_model

pytestmark = pytest.mark.service

DASHBOARDS = ("drift_monitor", "service_activity", "rollout")
ERROR_MARKERS = ("Traceback", "Error", "There was an error when executing cell")


def fill_project(root: Path, base: Path) -> dict:
    """A project folder like a served one: two published versions of `fashion_small` (the second
    with UAE/BBSD detectors and reference data, deployed after the first), 240 logged predictions
    over three days (the latest 30 noisy), api_log rows, and three runs of the monitor as the log grows."""
    from cvops.serving.inference import load_version
    from cvops.config import MonitorConfig
    from cvops.monitoring.check_drift import check_drift
    from cvops.predlog.images import ImageStore; from cvops.predlog.schema import api_log, feedback, make_engine, migrate, pack_features, predictions

    root.mkdir(parents=True)
    (root / "pipeline.yaml").write_text("tasks: []\n")
    storage = root / "central_storage"
    trained = train_small_model(base, seed=0, n_train=1500, epochs=2)
    xt, yt, classes, name = trained.images, trained.labels, trained.classes, trained.name
    v1 = publish_version(storage, trained.folder, name, trained.accuracy, classes=classes, deploy=True)
    time.sleep(0.01)
    v2 = tiny_version(storage, trained=trained, reference=(xt[:250], yt[:250]),   # images the model was not fitted on
                      monitor={"encoding_dim": 16, "seed": 0}, deploy=True, reason="detectors", work=base).version

    lv = load_version(storage / "models" / ".versions" / v2)
    rng = np.random.default_rng(0)
    imgs = xt[250:490].copy()                                     # 240 images the reference did not see
    noisy = imgs[-30:].astype(float) + rng.normal(0, 100, imgs[-30:].shape)
    imgs[-30:] = np.clip(noisy, 0, 255).astype(np.uint8)           # the latest 30: gaussian noise, std 100 (of 255)
    out = lv(imgs[..., None], heatmap=False)
    store = ImageStore(storage / "predictions" / "images")
    now = datetime.now(timezone.utc)
    times = [now - timedelta(days=3) + i * (timedelta(days=3) - timedelta(hours=1)) / len(imgs) for i in range(len(imgs))]
    api_rows, pred_rows = [], []
    for i, (im, t) in enumerate(zip(imgs, times)):
        rid = uuid.uuid4().hex
        latency = float(rng.lognormal(3.2, 0.4))
        version = v1 if i < 20 else v2
        sha, rel = store.put(encode(im, "PNG"), "PNG")
        api_rows.append(dict(request_id=rid, created_on=t, method="POST", route="/predict", path="/predict", status_code=200,
                             latency_ms=latency, client="127.0.0.1", model_version=version, error=None))
        pred_rows.append(dict(request_id=rid, created_on=t, model_name=name, model_version=version,
                              top_class=classes[int(out["probs"][i].argmax())],
                              probabilities={c: float(p) for c, p in zip(classes, out["probs"][i])},
                              image_sha256=sha, image_path=rel, latency_ms=latency,
                              features=None, **pack_features(None if version == v1 else {"uae": out["uae"][i], "bbsd": out["bbsd"][i]})))
    for k, (route, code, err) in enumerate([("/predict", 415, "unsupported content type 'text/plain'"), ("/predict", 413, "too large"),
                                             ("/predict", 500, "internal error"), ("/models/current", 200, None), ("/ready", 200, None)] * 4):
        api_rows.append(dict(request_id=uuid.uuid4().hex, created_on=now - timedelta(hours=60 - 3 * k), method="GET" if code == 200 else "POST",
                             route=route, path=route, status_code=code, latency_ms=float(rng.uniform(1, 5)), client="10.0.0.7",
                             model_version=v2, error=err))

    # the drift reports: three runs of the real monitor (`check_drift`, what `cvops monitor` runs) as the log grows:
    # 21 rows of v2 (too few: insufficient data), then 131 unshifted ones, then the latest 100 with the 30 noisy
    # ones and feedback for 18 of them (live accuracy)
    engine = make_engine(f"sqlite:///{root / 'var' / 'cvops.db'}")
    migrate(engine)
    cfg = MonitorConfig(window_days=7, window_rows=100, min_rows=30, permutations=200, seed=0)
    fb_rows = [dict(request_id=r["request_id"], created_on=times[-1], labels=[classes[int(yt[250 + 222 + i])]], source="tests")
               for i, r in enumerate(pred_rows[-18:])]
    runs = []
    with engine.begin() as c: c.execute(api_log.insert(), api_rows)
    for first, last, run_at in ((0, 41, times[40]), (41, 151, times[150]), (151, len(pred_rows), now - timedelta(minutes=31))):
        with engine.begin() as c:
            c.execute(predictions.insert(), pred_rows[first:last])
            if last == len(pred_rows): c.execute(feedback.insert(), fb_rows)
        runs.append(check_drift(root, cfg, engine=engine, storage=storage, now=run_at + timedelta(minutes=1), notify=False))
    engine.dispose()
    assert [runs[0].run_alert["verdict"], runs[-1].run_alert["verdict"]] == ["insufficient data", "drift"], [r.table() for r in runs]
    return {"root": root, "storage": storage, "v1": v1, "v2": v2, "classes": classes, "noisy": {r["request_id"] for r in pred_rows[-30:]}}


@pytest.fixture(scope="module")
def monitored_project(tmp_path_factory) -> dict:
    "`fill_project`, built once for the tests of this module (a test that changes it works on a copy)."
    base = tmp_path_factory.mktemp("monitored")
    return fill_project(base / "project", base)


@pytest.fixture
def browser(tmp_path):
    "Headless Chromium through the system chromedriver; quit when the test ends, pass or fail."
    yield from headless_chromium(tmp_path, "1200,900", 120)


def rendered_images(browser, url: str, shot: Path, min_images: int, timeout=120) -> list:
    "Open `url`, wait for Voila to render `min_images` loaded images; screenshot of the whole page; (naturalWidth, naturalHeight) of each."
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(url)
    js = ("return Array.from(document.querySelectorAll('.jp-OutputArea-output img'))"
          ".map(i => [i.complete ? i.naturalWidth : 0, i.complete ? i.naturalHeight : 0])")
    WebDriverWait(browser, timeout).until(lambda d: len([s for s in d.execute_script(js) if s[0] > 0]) >= min_images)
    h = browser.execute_script("return Math.max(...Array.from(document.querySelectorAll('*')).map(e => e.scrollHeight))")   # Voila scrolls an inner panel
    browser.set_window_size(1200, min(max(900, h + 100), 8000))
    browser.save_screenshot(str(shot))
    return browser.execute_script(js)


def test_dashboards_render_the_monitoring_data(tmp_path, monitored_project, voila_factory, browser):
    "Both dashboards over HTTP (outputs, figures, no error) and in headless Chromium (the figures load, no error shown)."
    from selenium.webdriver.common.by import By
    project = monitored_project
    voila = voila_factory(project["root"])

    t0 = time.time()
    drift = requests.get(voila.url("/voila/render/drift_monitor.ipynb"), timeout=180)
    t_drift = time.time() - t0
    assert drift.status_code == 200, drift.text[-2000:]
    outs = check_rendered_html(drift.text, "drift monitor")
    figures = pngs(outs)
    # predictions over time, classes vs reference, p-value history, live accuracy, GradCAM overlays
    assert len(figures) == 5, [im.size for im in figures]
    assert all(im.size[0] >= 900 and im.size[1] >= 200 for im in figures[:4]), [im.size for im in figures]
    text = text_of(outs)
    assert project["v2"] in text and "latest drift run" in text, text[:2000]
    for test in ("ks_bbsd_bonferroni", "mmd_uae", "chi2_predicted"): assert test in text
    for col in ("estimated_accuracy", "estimated_low", "estimated_high", "label_delay_s"): assert col in text   # the accuracy table
    verdicts = re.findall(r"<td>(drift|no drift|insufficient data)</td>", text)
    assert verdicts[:3] == ["drift"] * 3, verdicts                 # the latest run's verdicts lead the tables
    top = re.findall(r"<td>([0-9a-f]{32})</td>", text)            # the request ids of the inputs shown with their overlays
    # 30 of the latest run's 100 window rows are noisy: by chance 3.6 of 12 would be; measured 11
    assert len(top) == 12 and len(set(top) & project["noisy"]) >= 8, (len(top), len(set(top) & project["noisy"]))

    t0 = time.time()
    activity = requests.get(voila.url("/voila/render/service_activity.ipynb"), timeout=180)
    t_activity = time.time() - t0
    assert activity.status_code == 200, activity.text[-2000:]
    outs = check_rendered_html(activity.text, "service activity")
    assert len(pngs(outs)) == 2                                    # requests over time, latency
    text = text_of(outs)
    for s in ("/predict", "415", "413", "500", "/models/current", project["v1"], project["v2"], "unsupported content type"):
        assert s in text, s
    print(f"render over HTTP: drift monitor {t_drift:.1f} s, service activity {t_activity:.1f} s")

    for name, n_images in (("drift_monitor", 5), ("service_activity", 2)):
        shot = tmp_path / f"{name}.png"
        sizes = rendered_images(browser, voila.url(f"/voila/render/{name}.ipynb"), shot, n_images)
        if os.environ.get("CVOPS_KEEP_SCREENSHOTS"): shutil.copy(shot, Path(os.environ["CVOPS_KEEP_SCREENSHOTS"]) / shot.name)
        assert len(sizes) == n_images and all(w > 0 and h > 0 for w, h in sizes), sizes
        body = browser.find_element(By.TAG_NAME, "body").text
        for marker in ERROR_MARKERS: assert marker not in body, f"{name}: '{marker}' on the page (screenshot {shot})"
        assert shot.stat().st_size > 20_000, shot


def test_dashboards_say_so_when_there_is_no_data(tmp_path, voila_factory):
    "A project where nothing ran yet: both dashboards render messages, not errors, and create no database."
    root = tmp_path / "empty"
    (root / "central_storage").mkdir(parents=True)
    (root / "pipeline.yaml").write_text("tasks: []\n")
    voila = voila_factory(root)
    for name, expected in (("drift_monitor", ("Nothing is deployed yet", "No predictions yet", "No drift reports yet", "No live accuracy yet")),
                           ("service_activity", ("Nothing is deployed yet", "No requests yet", "Nothing deployed yet")),
                           ("rollout", ("No rollout is running", "No rollout yet"))):
        r = requests.get(voila.url(f"/voila/render/{name}.ipynb"), timeout=180)
        assert r.status_code == 200, r.text[-2000:]
        outs = check_rendered_html(r.text, name)
        assert not pngs(outs)
        text = text_of(outs)
        for e in expected: assert e in text, (name, e, text)
        assert "no prediction-log database yet" in text
    assert not (root / "var").exists()


def shadow_rollout(project: dict, root: Path, base: Path) -> dict:
    """A copy of `project` at `root` with a third version of the model (another seed, fewer images: it disagrees with the
    serving one) in shadow since now: its outputs for the serving version's latest 120 logged requests, computed by the
    candidate from their stored images and logged in `shadow_predictions` as the service logs them, one of them failed."""
    from PIL import Image
    from cvops.predlog.images import ImageStore
    from cvops.predlog.schema import make_engine, predictions, shadow_predictions
    from cvops.registry.rollout import start_rollout
    from cvops.serving.inference import load_version
    shutil.copytree(project["root"], root, symlinks=True)   # the published-model links are relative
    storage = root / "central_storage"
    trained = train_small_model(base, seed=1, n_train=300, epochs=1)
    v3 = publish_version(storage, trained.folder, trained.name, trained.accuracy, classes=trained.classes)
    record = start_rollout(storage, trained.name, v3, mode="shadow", fraction=0.5, by="tests", reason="a candidate from fewer images")
    engine = make_engine(f"sqlite:///{root / 'var' / 'cvops.db'}")
    with engine.connect() as c:
        rows = c.execute(sa.select(predictions.c.request_id, predictions.c.top_class, predictions.c.image_path)
                         .where(predictions.c.model_version == project["v2"]).order_by(predictions.c.created_on.desc()).limit(120)).all()
    store = ImageStore(storage / "predictions" / "images")
    images = np.stack([np.asarray(Image.open(io.BytesIO(store.read(r.image_path)))) for r in rows])
    out = load_version(storage / "models" / ".versions" / v3)(images[..., None], heatmap=False)
    cand = [trained.classes[int(p.argmax())] for p in out["probs"]]
    now = datetime.now(timezone.utc)
    shadow = [dict(request_id=r.request_id, created_on=now, role="shadow", model_name=trained.name, model_version=v3, top_class=t,
                   probabilities={c: float(x) for c, x in zip(trained.classes, p)}, latency_ms=2.0, error=None)
              for r, t, p in zip(rows[1:], cand[1:], out["probs"][1:])]
    shadow.append(dict(request_id=rows[0].request_id, created_on=now, role="shadow", model_name=trained.name, model_version=v3,
                       top_class=None, probabilities=None, latency_ms=None, error="ValueError: a failed shadow run"))
    with engine.begin() as c: c.execute(shadow_predictions.insert(), shadow)
    engine.dispose()
    pairs = [(r.top_class, t) for r, t in zip(rows[1:], cand[1:])]
    return {"root": root, "storage": storage, "v3": v3, "record": record, "pairs": pairs}


def test_rollout_dashboard_compares_the_candidate_with_the_serving_version(tmp_path, monitored_project, voila_factory, browser):
    """The rollout page over HTTP (no error, no stderr) and in headless Chromium (the figures load): the candidate and the
    serving version named, the agreement rate on the same requests, the most frequent disagreement pair with its example
    requests and their overlays under both versions; after the rollout is aborted: the no-rollout message and its events."""
    from collections import Counter
    from selenium.webdriver.common.by import By
    from cvops.registry.rollout import abort_rollout
    t0 = time.time()
    ro = shadow_rollout(monitored_project, tmp_path / "rollout", tmp_path)
    t_setup = time.time() - t0
    differ = Counter((s, c) for s, c in ro["pairs"] if s != c)
    assert differ, "the candidate agrees with the serving version everywhere: no disagreement to draw"
    agreement = 1 - sum(differ.values()) / len(ro["pairs"])
    top_n = differ.most_common(1)[0][1]
    voila = voila_factory(ro["root"])

    n_images = 1 + min(4, len(differ))                             # the disagreement bars, one figure of examples per pair
    t0 = time.time()
    r = requests.get(voila.url("/voila/render/rollout.ipynb"), timeout=180)
    t_http = time.time() - t0
    assert r.status_code == 200, r.text[-2000:]
    outs = check_rendered_html(r.text, "rollout")                  # no error, no stderr (library noise)
    figures = pngs(outs)
    assert len(figures) == n_images and all(im.size[0] >= 600 for im in figures), [im.size for im in figures]
    text = text_of(outs)
    for s in (ro["v3"], monitored_project["v2"], "**shadow**", f"Agreement rate: **{agreement:.1%}**",
              "the candidate failed on 1", "estimated accuracy (CBPE)", "<td>start</td>"):
        assert s in text, (s, text[:3000])
    top = [f"**{s}** (serving) -> **{c}** (candidate): {n} requests" for (s, c), n in differ.items() if n == top_n]
    assert any(t in text for t in top), (top, text[:3000])        # the most frequent pair(s), with example request ids
    assert len(set(re.findall(r"`([0-9a-f]{32})`", text))) >= 2 * min(4, len(differ)), text

    shot = tmp_path / "rollout.png"
    t0 = time.time()
    sizes = rendered_images(browser, voila.url("/voila/render/rollout.ipynb"), shot, n_images)
    if os.environ.get("CVOPS_KEEP_SCREENSHOTS"): shutil.copy(shot, Path(os.environ["CVOPS_KEEP_SCREENSHOTS"]) / shot.name)
    assert len(sizes) == n_images and all(w > 0 and h > 0 for w, h in sizes), sizes
    body = browser.find_element(By.TAG_NAME, "body").text
    for marker in ERROR_MARKERS: assert marker not in body, f"rollout: '{marker}' on the page (screenshot {shot})"
    assert f"Agreement rate: {agreement:.1%}" in body and any(t.replace("**", "") in body for t in top), body[:3000]

    t_browser = time.time() - t0

    abort_rollout(ro["storage"], by="tests", reason="seen enough")
    t0 = time.time()
    r = requests.get(voila.url("/voila/render/rollout.ipynb"), timeout=180)
    assert r.status_code == 200, r.text[-2000:]
    outs = check_rendered_html(r.text, "rollout, none running")
    text = text_of(outs)
    assert "No rollout is running" in text and not pngs(outs), text[:2000]
    assert re.findall(r"<td>(abort|start)</td>", text)[:2] == ["abort", "start"] and ro["v3"] in text, text[-3000:]
    print(f"rollout: a candidate in shadow {t_setup:.1f} s; the page over HTTP {t_http:.1f} s, in Chromium {t_browser:.1f} s, "
          f"with no rollout {time.time() - t0:.1f} s")
