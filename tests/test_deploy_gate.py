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


# --- rollouts: a candidate in shadow or canary, promoted or aborted (issue 14, part 1) ------------------------------
from concurrent.futures import ThreadPoolExecutor

from cvops.registry.rollout import current_candidate, rollout_history
from cvops.serving.worker import in_canary
from cvops.testing import ADMIN_TOKEN, PredictionLoad

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _rollout(g, method, path, **body):
    return requests.request(method, g["svc"].url(path), json=body, headers=ADMIN, timeout=180)


def _no_rollout(g, serving):
    if current_candidate(g["storage"]) is not None: assert _rollout(g, "POST", "/rollout/abort", reason="test setup").status_code == 200
    _ensure_serving(g, serving)
    g["svc"].wait_workers_candidate(None, timeout=30)


def _predict(g, x, client=None):
    h = {"Content-Type": "image/png", **({"X-Client-ID": client} if client else {})}
    r = requests.post(g["svc"].url("/predict") + "?heatmap=false", data=encode(x, "PNG"), headers=h, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["X-Model-Version"] == r.json()["model_version"], r.headers
    return r.json()


def _shadow_rows(g, ids) -> dict:
    import sqlalchemy as sa
    from cvops.predlog.schema import shadow_predictions as s
    eng = sa.create_engine(f"sqlite:///{g['root'] / 'var' / 'cvops.db'}")
    try:
        with eng.connect() as c:
            rows = c.execute(sa.select(s.c.request_id, s.c.model_version, s.c.top_class, s.c.probabilities, s.c.error)
                             .where(s.c.request_id.in_(list(ids)))).all()
    finally: eng.dispose()
    return {r.request_id: r for r in rows}


def test_a_shadow_rollout_logs_both_versions_on_the_same_requests_and_every_answer_is_the_serving_versions(gate):
    g, v = gate, gate["v"]
    _no_rollout(g, v["a"])
    r = _rollout(g, "PUT", "/rollout", model_name=NAME, version=v["b"], mode="shadow", fraction=1.0, reason="shadow test")
    assert r.status_code == 200, r.text
    assert r.json()["checks"]["golden"].startswith(f"{g['n_golden']} of {g['n_golden']} golden-set images"), r.json()["checks"]
    g["svc"].wait_workers_candidate(v["b"], timeout=30)
    with ThreadPoolExecutor(4) as pool: answers = list(pool.map(lambda x: _predict(g, x), g["images"]))
    assert {a["model_version"] for a in answers} == {v["a"]}            # the user always gets the serving version's answer
    ids = {a["request_id"]: a for a in answers}
    deadline, rows = time.time() + 30, {}
    while time.time() < deadline and len(rows) < len(ids):
        rows = _shadow_rows(g, ids); time.sleep(0.3)
    assert set(rows) == set(ids) and {r.model_version for r in rows.values()} == {v["b"]}, (len(rows), len(ids))
    assert all(r.error is None and abs(sum(json.loads(r.probabilities).values() if isinstance(r.probabilities, str) else r.probabilities.values()) - 1) < 1e-3
               for r in rows.values())
    st = requests.get(g["svc"].url("/rollout"), timeout=60).json()
    assert st["candidate"]["version"] == v["b"] and set(st["workers_candidate"].values()) == {v["b"]}, st
    for _ in range(60):   # the serving version's rows too: the comparison joins them
        j = subprocess.run([str(BIN / "cvops"), "rollout", "status", "--json"], cwd=g["root"], env=g["svc"].env,
                           capture_output=True, text=True, timeout=120)
        assert j.returncode == 0, j.stdout + j.stderr
        cmp = json.loads(j.stdout)["comparison"]
        if cmp["n_pairs"] >= len(ids): break
        time.sleep(0.5)
    assert cmp["mode"] == "shadow" and cmp["n_pairs"] >= len(ids), cmp
    agree = sum(rows[i].top_class == ids[i]["top_class"] for i in ids) / len(ids)
    p = subprocess.run([str(BIN / "cvops"), "rollout", "status"], cwd=g["root"], env=g["svc"].env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and f"candidate {v['b']} (shadow, 1)" in p.stdout, p.stdout + p.stderr
    assert re.search(rf"same requests: {cmp['n_pairs']}, agreement [\d.]+", p.stdout), p.stdout
    assert cmp["n_pairs"] > len(ids) or abs(cmp["agreement"] - agree) < 1e-4, (cmp["agreement"], agree)
    # abort: the serving version alone answers, nothing more is shadowed
    r = _rollout(g, "POST", "/rollout/abort", reason="seen enough")
    assert r.status_code == 200 and r.json()["version"] == v["b"], r.text
    g["svc"].wait_workers_candidate(None, timeout=30)
    after = {a["request_id"] for a in (_predict(g, x) for x in g["images"][:6])}
    time.sleep(1.0)
    assert not _shadow_rows(g, after) and current_deployment(g["storage"])["version"] == v["a"]
    assert [e["event"] for e in rollout_history(g["storage"], 2)] == ["abort", "start"]


def test_a_canary_answers_its_share_of_clients_sticky_and_promote_under_load_fails_no_request(gate):
    g, v = gate, gate["v"]
    _no_rollout(g, v["a"])
    p = subprocess.run([str(BIN / "cvops"), "rollout", "start", NAME, "--version", v["b"], "--mode", "canary", "--fraction", "0.2",
                        "--by", "canary-test"], cwd=g["root"], env=g["svc"].env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and f"{v['b']} is the candidate in canary, 20% of clients answered by it" in p.stdout, p.stdout + p.stderr
    g["svc"].wait_workers_candidate(v["b"], timeout=30)
    clients = [f"client-{i}" for i in range(60)]
    def two(i):   # each client twice, from any worker: the same version both times
        return [_predict(g, g["images"][(i + k) % len(g["images"])], clients[i])["model_version"] for k in range(2)]
    with ThreadPoolExecutor(4) as pool: got = list(pool.map(two, range(len(clients))))
    assert all(a == b for a, b in got), got                                  # sticky per client
    expect = [v["b"] if in_canary(c, v["b"], 0.2) else v["a"] for c in clients]
    assert [a for a, _ in got] == expect, (got, expect)
    share = sum(e == v["b"] for e in expect) / len(clients)
    assert 0.08 <= share <= 0.35, share                                     # about 20 % of the clients
    # promote under load: every request answered
    with PredictionLoad(g["svc"], [encode(x, "PNG") for x in g["images"][:10]], n=4) as load:
        time.sleep(1.0)
        r = _rollout(g, "POST", "/rollout/promote", reason="canary looks good")
        time.sleep(2.0)
    assert r.status_code == 200 and r.json()["version"] == v["b"] and r.json()["previous_version"] == v["a"], r.text
    assert not load.failed() and len(load.results) > 20, (load.failed()[:3], len(load.results))
    _every_worker_serves(g, v["b"])
    g["svc"].wait_workers_candidate(None, timeout=30)
    assert current_candidate(g["storage"]) is None
    assert deployment_history(g["storage"], 1)[0]["reason"].startswith("promoted from canary (0.2): canary looks good")
    assert [e["event"] for e in rollout_history(g["storage"], 2)] == ["promote", "start"]
    _ensure_serving(g, v["a"])


def test_a_candidate_whose_golden_set_does_not_match_is_refused(gate):
    g, v = gate, gate["v"]
    _no_rollout(g, v["a"])
    n = len(rollout_history(g["storage"]))
    r = _rollout(g, "PUT", "/rollout", model_name=NAME, version=v["altered"], mode="shadow", fraction=0.5)
    assert r.status_code == 409 and "golden-set images do not give the predictions" in r.json()["error"], r.text
    assert current_candidate(g["storage"]) is None and len(rollout_history(g["storage"])) == n
    g["svc"].wait_workers_candidate(None, timeout=3)
