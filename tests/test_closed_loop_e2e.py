"""The closed loop end to end (issue 14), as people run it, every step a real process: a project with the pipeline and
the monitor, a served version (a small Fashion-MNIST model with its detectors and 1,000 reference images it never saw)
behind `cvops serve` (2 workers); shifted traffic over HTTP (gaussian noise, std 100 on 0-255) with feedback labels
for every third answer; `cvops monitor` sees the drift and, by the config's `retrain.drift_runs: 1`, proposes a
retraining; `cvops dataset add-feedback` turns the feedback-labelled images into dataset version v2.1.0; `cvops retrain`
builds the real pipeline on it and its version becomes the candidate in shadow (gated), which every worker loads and
runs on the requests that follow; the rollout page shows the proposal, the candidate and the comparison; `cvops approve`
promotes it; the proposal, the rollouts and the deployments record each step, and the page says so. A second
`cvops retrain` with nothing new to train on fails its proposal and moves nothing."""
import csv
import json
import re
import shutil
import subprocess
import time

import numpy as np
import pytest
import requests
import yaml

from conftest import REPO, base_config, check_rendered_html, text_of
from cvops.data.dataset import git, list_git_tags
from cvops.settings import default_db_url
from cvops.testing import BIN, Service, Webhook, encode, monitor_env, run_monitor, tiny_version, train_small_model, wait_predictions_logged

pytestmark = [pytest.mark.service, pytest.mark.e2e]

# A permutation test's p-value is at least 1 / (permutations + 1), and Holm over the 4 tests multiplies the third
# smallest by 2 (the fourth by 1): with 200 permutations the UAE test's smallest p, 0.004975, came out 0.00995 > alpha.
# 1000 keep that floor under alpha / 3 wherever it ranks.
MONITOR = {"window_days": 1, "window_rows": 150, "min_rows": 30, "alpha": 0.005, "permutations": 1000, "max_test_rows": 1000,
           "reference_size": 100, "seed": 0}
N_SHIFTED, FEEDBACK_EVERY, N_SHADOWED = 150, 3, 30


def _json(path):
    return json.loads(path.read_text())


def _served_version(base, storage) -> dict:
    "The serving version: the small model (3,000 training images) named as the config's model, with detectors, deployed."
    from cvops.data.dataset import load_default_source
    from cvops.testing import small_model_config
    src = load_default_source()
    trained = train_small_model(base, seed=0, cfg=small_model_config("test_model"))
    v = tiny_version(storage, trained=trained, reference=(src.test[0][500:1500], src.test[1][500:1500]),
                     monitor={"encoding_dim": 32, "seed": 0}, deploy=True, work=base, reason="the first version")
    return {"version": v.version, "classes": trained.classes, "images": src.test[0], "labels": src.test[1]}


def _shifted(images, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, 100, images.shape), 0, 255).astype(np.uint8)


def _send(svc, images, labels, classes, feedback_every=0) -> list[dict]:
    "Predict each image over HTTP; after every `feedback_every`-th answer, POST its true label. The answers, with `feedback`."
    out = []
    for i, (x, y) in enumerate(zip(images, labels)):
        r = svc.predict(encode(x), heatmap=False)
        assert r.status_code == 200, r.text[:300]
        d = r.json()
        if feedback_every and i % feedback_every == 0:
            f = requests.post(svc.url("/feedback"), json={"request_id": d["request_id"], "labels": [classes[y]]}, timeout=30)
            assert f.status_code == 200, f.text
            d["feedback"] = classes[y]
        out.append(d)
    return out


def _rollout_status(project, env, n_pairs, timeout=60) -> dict:
    "`cvops rollout status --json` once its comparison counts `n_pairs` requests both versions answered."
    deadline = time.time() + timeout
    while True:
        p = subprocess.run([str(BIN / "cvops"), "rollout", "status", "--json"], cwd=project.path, env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        st = json.loads(p.stdout)
        if st["comparison"]["n_pairs"] >= n_pairs or time.time() > deadline: return st
        time.sleep(0.5)


def _page(voila) -> str:
    r = requests.get(voila.url("/voila/render/rollout.ipynb"), timeout=240)
    assert r.status_code == 200, r.text[-2000:]
    return text_of(check_rendered_html(r.text, "rollout"))          # no error output, no stderr


def test_drift_proposes_feedback_retrains_a_shadow_candidate_and_an_approval_promotes_it(project, tiny_fashion_repo, tmp_path,
                                                                                          voila_factory):
    repo = tmp_path / "fm"                           # a copy: the new tag stays out of the session's dataset repository
    shutil.copytree(tiny_fashion_repo, repo, symlinks=True)
    shutil.copy(REPO / "pipeline.monitor.yaml", project.path / "pipeline.monitor.yaml")
    shutil.copytree(REPO / "notebooks" / "monitor", project.path / "notebooks" / "monitor")
    project.write_config(base_config(dataset={"path": str(repo)}, deploy={"max_regression": 1.0}, monitor=MONITOR,
                                     retrain={"drift_runs": 1, "candidate_mode": "shadow", "candidate_fraction": 1.0}))
    storage, root = project.path / "central_storage", project.path
    served = _served_version(tmp_path / "build", storage)
    serving, classes = served["version"], served["classes"]
    hook = Webhook()
    env = monitor_env(root, hook.url)
    svc = Service(root, workers=2)
    try:
        svc.start()
        svc.wait_workers_ready(serving)

        # 1. shifted traffic with feedback labels; the monitor sees the drift and proposes retraining
        x, y = _shifted(served["images"][1500:1500 + N_SHIFTED]), served["labels"][1500:1500 + N_SHIFTED]
        answers = _send(svc, x, y, classes, FEEDBACK_EVERY)
        labelled = {a["request_id"]: a["feedback"] for a in answers if "feedback" in a}
        wait_predictions_logged(default_db_url(root), N_SHIFTED)
        out, rows = run_monitor(root, env)
        assert {"bbsd", "uae"} <= {r["features"] for r in rows if r["verdict"] == "drift"}, out
        m = re.search(rf"^retraining proposed: (\S+) for {re.escape(serving)} \(([^)]*drift[^)]*)\); `cvops retrain \1` builds a candidate",
                      out, re.M)
        assert m, out
        pid = m.group(1)
        assert _json(storage / "deployments" / "proposals" / f"{pid}.json")["status"] == "proposed"

        # 2. the feedback-labelled images become a new dataset version
        fb = project.run("cvops", "dataset", "add-feedback").stdout
        assert fb.startswith(f"v2.1.0: {len(labelled)} feedback-labelled images added to the train split of "), fb
        assert list_git_tags(repo)[-1] == "v2.1.0" and git(repo, "status", "--porcelain") == ""
        with (repo / "feedback_provenance.csv").open(newline="") as f:
            prov = {p["request_id"]: (json.loads(p["labels"]), p["model_version"], p["added_in"]) for p in csv.DictReader(f)}
        assert prov == {rid: ([label], serving, "v2.1.0") for rid, label in labelled.items()}

        # 3. cvops retrain builds the pipeline on v2.1.0; the new version waits beside the serving one, in shadow
        rt = project.run("cvops", "retrain", pid, "--by", "ann").stdout
        assert f"proposal {pid}: building a candidate on dataset tag v2.1.0 " in rt, rt
        cand = _json(storage / "deployments" / "candidate.json")
        new = cand["version"]
        assert (cand["mode"], cand["fraction"], cand["proposal"], cand["serving_version"]) == ("shadow", 1.0, pid, serving), cand
        assert new != serving and _json(storage / "deployments" / "current.json")["version"] == serving
        assert "golden-set images give the predictions evaluation made" in cand["checks"]["golden"], cand["checks"]
        assert "recent requests replayed without an error" in cand["checks"]["replay"], cand["checks"]   # the service's own log
        meta = yaml.safe_load((storage / "models" / ".versions" / new / "metadata.yaml").read_text())
        assert meta["lineage"]["dataset"]["tag"] == "v2.1.0", meta["lineage"]

        # 4. every worker runs it on the requests that follow; every answer is still the serving version's
        svc.wait_workers_candidate(new)
        more = _send(svc, _shifted(served["images"][1700:1700 + N_SHADOWED], seed=1), served["labels"][1700:1700 + N_SHADOWED], classes)
        assert {a["model_version"] for a in more} == {serving}
        st = _rollout_status(project, svc.env, N_SHADOWED)
        cmp = st["comparison"]
        assert cmp["mode"] == "shadow" and cmp["n_pairs"] >= N_SHADOWED and cmp["candidate_errors"] == 0, cmp

        # 5. the rollout page: the proposal, the candidate beside the serving version, their agreement
        voila = voila_factory(root)
        text = _page(voila)
        for s in (f"Candidate **{new}**", f"serving **{serving}**", "**shadow**", "Agreement rate: **",
                  f"retraining proposal **{pid}**", "trained on dataset tag **v2.1.0**", "waits for `cvops approve`"):
            assert s in text, (s, text[:4000])

        # 6. a person approves: the pointer moves, every worker serves the new version, the histories say so
        ap = project.run("cvops", "approve", pid[:20], "--reason", "agrees with the serving model on shifted images", "--by", "carol")
        assert ap.stdout.startswith(f"approved proposal {pid}: {new} deployed (was {serving}); recorded: carol at "), ap.stdout
        svc.wait_workers_ready(new)
        svc.wait_workers_candidate(None)
        x0 = svc.predict(encode(served["images"][0]), heatmap=False)
        assert x0.status_code == 200 and x0.json()["model_version"] == new, x0.text[:300]
        p = _json(storage / "deployments" / "proposals" / f"{pid}.json")
        assert [h["status"] for h in p["history"]] == ["proposed", "retraining", "candidate", "approved"], p["history"]
        assert (p["decision"]["approved"], p["decision"]["by"], p["dataset_tag"], p["candidate_version"]) == (True, "carol", "v2.1.0", new)
        assert p["decision"]["comparison"]["shadow"]["n_pairs"] >= N_SHADOWED, p["decision"]["comparison"]
        events = [json.loads(line) for line in (storage / "deployments" / "rollouts.jsonl").read_text().splitlines()]
        assert [(e["event"], e["version"]) for e in events] == [("start", new), ("promote", new)], events
        assert events[0]["proposal"] == pid and events[1]["approval"]["proposal"] == pid and events[1]["by"] == "carol"
        deployed = [json.loads(line) for line in (storage / "deployments" / "history.jsonl").read_text().splitlines()]
        assert [d["version"] for d in deployed][-2:] == [serving, new] and f"proposal {pid} approved: agrees" in deployed[-1]["reason"]
        text = _page(voila)
        assert "No rollout is running" in text, text[:3000]
        assert re.findall(r"<td>(promote|start)</td>", text)[:2] == ["promote", "start"], text[-4000:]
        assert re.search(rf"<td>{pid}</td>\s*<td>approved</td>", text) and "agrees with the serving model" in text, text[-4000:]

        # 7. nothing new to train on: the build makes no version, the proposal fails with why; nothing moves
        again = project.run("cvops", "retrain", check=False)
        assert again.returncode == 2 and "the build made no new version" in again.stderr and "--force" in again.stderr, again.stderr
        assert _json(storage / "deployments" / "current.json")["version"] == new
        failed = [q for q in map(_json, (storage / "deployments" / "proposals").glob("*.json")) if q["id"] != pid]
        assert [(q["status"], q["trigger"]["rules"]) for q in failed] == [("failed", ["manual"])], failed
    finally:
        svc.stop()
        hook.close()
