"""The gate every deployment passes (issue 14), over real processes: `cvops deploy` and PUT /models/current on a
2-worker `cvops serve` refuse a version whose golden-set predictions do not match evaluation's, and one that fails on a
replay of the requests the service logged; a good version passes and every worker serves it. A refusal changes nothing:
the pointer, its history and what every worker serves stay as they were."""
import json
import re
import subprocess
import time

import pytest
import requests

from cvops.registry.versions import current_deployment, deployment_history
from cvops.serving.worker import workers_serving
from cvops.testing import BIN, Service, encode, golden_set_files, images_dataset, publish_version, service_project, wait_predictions_logged

NAME = "fashion_small"


def _overflowing(trained, out):
    "The model of `trained` with its first convolution's kernel scaled by 1e38: the warm-up's zeros give finite probabilities, real images do not."
    from cvops.config import ModelConfig
    from cvops.training.model import load_keras_model, save_trained_model
    model = load_keras_model(trained.folder)
    conv = next(l for l in model.layers if l.__class__.__name__ == "Conv2D")
    w, b = conv.get_weights()
    conv.set_weights([w * 1e38, b])
    cfg = ModelConfig(**json.loads((trained.folder / "model_info.json").read_text())["model"])
    return save_trained_model(model, out, cfg, trained.classes)


@pytest.fixture(scope="module")
def gate(tmp_path_factory, trained_models):
    """A project whose central storage holds: a (serving) and b, each with the golden set of its model on 200 held-out
    images; a with one top class of its golden.json changed; a model that overflows on real images, with no golden set
    (as versions published before golden sets); and a 2-worker service serving a."""
    base = tmp_path_factory.mktemp("gate")
    root = service_project(base / "project")
    storage = root / "central_storage"
    a, b = trained_models["a"], trained_models["b"]
    images_dataset(base / "held-out", a.images[:200], a.labels[:200], a.classes, splits="test")   # never trained on
    golden = {k: golden_set_files(t.folder, base / "held-out", base / f"golden-{k}", n=100) for k, t in (("a", a), ("b", b))}
    doc = json.loads(golden["a"]["golden/golden.json"].read_text())
    changed = doc["images"][7]
    other = next(c for c in a.classes if c != changed["top_class"])
    altered = base / "altered.json"
    altered.write_text(json.dumps({**doc, "images": [*doc["images"][:7], {**changed, "top_class": other}, *doc["images"][8:]]}))
    v = {"a": publish_version(storage, a.folder, NAME, a.accuracy, golden["a"], deploy=True)}
    for key, folder, files in (("b", b.folder, golden["b"]), ("altered", a.folder, {**golden["a"], "golden/golden.json": altered}),
                               ("overflow", _overflowing(a, base / "overflow"), None)):
        time.sleep(0.01)
        v[key] = publish_version(storage, folder, NAME, a.accuracy, files)
    svc = Service(root, workers=2)
    try:
        svc.start()
        svc.wait_workers_ready(v["a"])
        yield {"root": root, "storage": storage, "svc": svc, "v": v, "n_golden": len(doc["images"]), "changed": changed,
               "other": other, "images": a.images[200:230]}
    finally:
        svc.stop()


def _count_predictions(db_url) -> int:
    import sqlalchemy as sa
    from cvops.predlog.schema import predictions
    eng = sa.create_engine(db_url)
    try:
        with eng.connect() as c:
            return c.execute(sa.select(sa.func.count()).select_from(predictions)).scalar() if sa.inspect(eng).has_table("predictions") else 0
    finally:
        eng.dispose()


def _cli_deploy(g, version):
    return subprocess.run([str(BIN / "cvops"), "deploy", NAME, "--version", version, "--by", "gate-test"], cwd=g["root"],
                          env=g["svc"].env, capture_output=True, text=True, timeout=180)


def _every_worker_serves(g, version, timeout=30):
    "Every worker of the service answers /models/current with `version`, and says so in its status file."
    svc = g["svc"]
    svc.wait_workers_ready(version, timeout)
    pids, deadline = set(svc.worker_pids()), time.time() + timeout
    seen = {}
    while set(seen) != pids and time.time() < deadline:   # each worker's own answer (connections spread over both)
        cur = requests.get(svc.url("/models/current"), timeout=10).json()
        seen[cur["worker_pid"]] = cur["version"]
    assert set(seen) == pids and set(seen.values()) == {version}, (seen, pids)
    assert set(workers_serving(g["root"] / "var").values()) == {version}, workers_serving(g["root"] / "var")


def _ensure_serving(g, version):
    if current_deployment(g["storage"])["version"] != version:
        r = g["svc"].deploy(NAME, version)
        assert r.status_code == 200, r.text
    _every_worker_serves(g, version)


def test_a_version_whose_golden_set_does_not_match_is_refused_by_the_cli_and_over_http(gate):
    g, v = gate, gate["v"]
    _ensure_serving(g, v["a"])
    pointer, history = current_deployment(g["storage"]), deployment_history(g["storage"])
    expect = (rf"version {re.escape(v['altered'])} refused: 1 of {g['n_golden']} golden-set images do not give the predictions "
              rf"evaluation made \(the same top class, every probability within 0\.0001\): {re.escape(g['changed']['file'])}: "
              rf"expected {re.escape(g['other'])} [\d.]+, got {re.escape(g['changed']['top_class'])} [\d.]+")

    p = _cli_deploy(g, v["altered"])
    assert p.returncode == 2 and re.search(rf"^error: {expect}", p.stderr, re.M), (p.returncode, p.stdout, p.stderr)
    assert p.stdout == ""
    r = g["svc"].deploy(NAME, v["altered"])
    assert r.status_code == 409 and re.match(expect, r.json()["error"]), r.text

    assert current_deployment(g["storage"]) == pointer and deployment_history(g["storage"]) == history
    _every_worker_serves(g, v["a"])
    x = g["svc"].predict(encode(g["images"][0]))
    assert x.status_code == 200 and x.json()["model_version"] == v["a"], x.text[:300]

    # a version whose golden set matches passes and is served, by every worker
    r = g["svc"].deploy(NAME, v["b"])
    assert r.status_code == 200, r.text
    checks = r.json()["checks"]
    assert checks["golden"].startswith(f"{g['n_golden']} of {g['n_golden']} golden-set images give the predictions evaluation made"), checks
    assert checks["warnings"] == [] and current_deployment(g["storage"])["checks"] == checks
    _every_worker_serves(g, v["b"])


def test_a_version_that_fails_on_a_replay_of_logged_requests_is_refused(gate):
    g, v, svc = gate, gate["v"], gate["svc"]
    _ensure_serving(g, v["a"])
    db_url = f"sqlite:///{g['root'] / 'var' / 'cvops.db'}"
    logged = _count_predictions(db_url)
    for img in g["images"]:                                     # 30 requests, each with another held-out image
        r = svc.predict(encode(img), heatmap=False)
        assert r.status_code == 200, r.text[:300]
    wait_predictions_logged(db_url, logged + len(g["images"]))
    n = len(g["images"])                                        # the replay takes each stored image once
    pointer, history = current_deployment(g["storage"]), deployment_history(g["storage"])

    # the overflowing version has no golden set (like a version published before golden sets): only the replay catches it
    expect = rf"version {re.escape(v['overflow'])} refused: \d+ of {n} recent requests replayed failed: [0-9a-f]{{64}}\.png: its probabilities are not finite"
    r = svc.deploy(NAME, v["overflow"])
    assert r.status_code == 409 and re.match(expect, r.json()["error"]), r.text
    p = _cli_deploy(g, v["overflow"])
    assert p.returncode == 2 and re.search(rf"^error: {expect}", p.stderr, re.M), (p.returncode, p.stdout, p.stderr)
    assert current_deployment(g["storage"]) == pointer and deployment_history(g["storage"]) == history
    _every_worker_serves(g, v["a"])

    # a good version replays them without an error, within the latency bound of the serving version's (by the CLI, which
    # loads the serving version itself to compare with)
    p = _cli_deploy(g, v["b"])
    assert p.returncode == 0 and f"deployed {v['b']} (was {v['a']})" in p.stdout, (p.returncode, p.stdout, p.stderr)
    assert re.search(rf"^  golden set: {g['n_golden']} of {g['n_golden']} golden-set images give the predictions", p.stdout, re.M), p.stdout
    assert re.search(rf"^  replay: {n} recent requests replayed without an error; p99 [\d.]+ ms per image, the serving "
                     rf"{re.escape(v['a'])}'s [\d.]+ ms \(bound [\d.]+ ms\)$", p.stdout, re.M), p.stdout
    assert "warning" not in p.stderr, p.stderr
    _every_worker_serves(g, v["b"])
