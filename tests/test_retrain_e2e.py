"""End to end: `cvops retrain` builds the real pipeline on the dataset's newest tag and makes the new version the
candidate beside the serving one (not deployed); `cvops approve` moves the pointer and the histories say so."""
import json
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import base_config
from cvops.registry.deploy import deploy
from cvops.registry.publish import publish_model
from cvops.testing import untrained_model

pytestmark = pytest.mark.e2e


def _json(path):
    return json.loads(path.read_text())


def test_retrain_makes_a_candidate_that_an_approval_deploys(project, tiny_fashion_repo, tmp_path):
    repo = tmp_path / "fm"                       # a copy: the new tag stays out of the session's repository
    shutil.copytree(tiny_fashion_repo, repo, symlinks=True)
    project.write_config(base_config(dataset={"path": str(repo)}, deploy={"max_regression": 1.0},
                                     retrain={"candidate_mode": "canary", "candidate_fraction": 0.5}))
    storage = project.path / "central_storage"
    # the serving version: a published stand-in (one pipeline build in this test, the retraining's)
    meta = {"model_name": "test_model", "metrics": {"accuracy": 0.5, "n_images": 10}, "lineage": {}}
    serving = publish_model(untrained_model(tmp_path, "test_model").folder, meta, storage)["version"]
    deploy(storage, "test_model", serving, by="tests")
    subprocess.run(["git", "-C", str(repo), "tag", "v2.1.0", "v2.0.0"], check=True)   # a new dataset version

    out = project.run("cvops", "retrain", "--by", "ann").stdout
    pid = re.search(r"^proposal (\S+): building a candidate on dataset tag v2\.1\.0 ", out, re.M).group(1)
    cand = _json(storage / "deployments" / "candidate.json")
    assert (cand["mode"], cand["fraction"], cand["proposal"], cand["serving_version"]) == ("canary", 0.5, pid, serving), cand
    assert cand["version"] != serving and _json(storage / "deployments" / "current.json")["version"] == serving   # not deployed
    assert re.search(rf"^  candidate version:  {re.escape(cand['version'])} \(canary 0\.5, beside {re.escape(serving)}\)$", out, re.M), out
    assert "note: configs/config.yaml still names dataset tag v2.0.0" in out, out
    assert "golden-set images give the predictions evaluation made" in cand["checks"]["golden"], cand["checks"]
    proposal = _json(storage / "deployments" / "proposals" / f"{pid}.json")
    assert (proposal["status"], proposal["candidate_version"], proposal["dataset_tag"]) == ("candidate", cand["version"], "v2.1.0")
    assert [h["status"] for h in proposal["history"]] == ["proposed", "retraining", "candidate"] and proposal["created_by"] == "ann"
    assert yaml.safe_load((project.path / "var" / "retrain" / f"{pid}.yaml").read_text())["dataset"]["tag"] == "v2.1.0"
    meta = yaml.safe_load((storage / "models" / ".versions" / cand["version"] / "metadata.yaml").read_text())
    assert meta["lineage"]["dataset"]["tag"] == "v2.1.0"                      # trained on the new dataset version
    assert _json(project.products() / "deploy" / "deployment.json")["candidate"] is True

    approve = project.run("cvops", "approve", pid[:20], "--reason", "agrees with the serving model", "--by", "carol")
    assert approve.stdout.startswith(f"approved proposal {pid}: {cand['version']} deployed (was {serving}); recorded: carol at "), approve.stdout
    assert _json(storage / "deployments" / "current.json")["version"] == cand["version"]
    assert _json(storage / "deployments" / "candidate.json") == {}
    promote = json.loads((storage / "deployments" / "rollouts.jsonl").read_text().splitlines()[-1])
    assert (promote["event"], promote["by"], promote["approval"]["proposal"]) == ("promote", "carol", pid), promote
    assert promote["approval"]["comparison"]["candidate"]["checks"]["golden"] == cand["checks"]["golden"]
    deployed = json.loads((storage / "deployments" / "history.jsonl").read_text().splitlines()[-1])
    assert deployed["version"] == cand["version"] and f"proposal {pid} approved: agrees" in deployed["reason"], deployed
    listed = project.run("cvops", "proposals").stdout
    assert re.search(rf"^{pid}  approved  ", listed, re.M) and "approved by carol at " in listed, listed

    # nothing new to train on: the build makes no version, the (manual) proposal fails with why; nothing moves
    again = project.run("cvops", "retrain", check=False)
    assert again.returncode == 2 and "the build made no new version" in again.stderr and "--force" in again.stderr, again.stderr
    assert _json(storage / "deployments" / "current.json")["version"] == cand["version"]
    failed = [p for p in map(_json, (storage / "deployments" / "proposals").glob("*.json")) if p["id"] != pid]
    assert [(p["status"], p["trigger"]["rules"]) for p in failed] == [("failed", ["manual"])], failed
