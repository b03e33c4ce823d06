"""A bad config fails before any work, with one line that names the problem, and leaves
central storage as it was."""
import pytest

from conftest import base_config


@pytest.fixture
def published(project, tmp_path):
    "A project with something already in central storage, to prove it is left alone."
    (project.path / "central_storage" / "models" / "old.yaml").write_text("model_name: old\n")
    return project


def _bad_configs(dataset_repo):
    "(case, config, fragments the one error line must hold: where, what, and the hint)."
    good = base_config(dataset={"path": str(dataset_repo)})
    yield ("unknown key", {**good, "train": {**good["train"], "epoch": 3}},
           ["config.yaml: ", "train.epoch: unknown key", "(did you mean 'epochs'?)"])
    yield ("wrong type", {**good, "train": {**good["train"], "epochs": "ten"}},
           ["config.yaml: ", "train.epochs: Input should be a valid integer", "(got 'ten')"])
    yield ("missing dataset path", {**good, "dataset": {**good["dataset"], "path": "datasets/nowhere"}},
           ["dataset.path: ", "datasets/nowhere does not exist"])
    yield ("unknown DVC tag", {**good, "dataset": {**good["dataset"], "tag": "v9.9.9"}},
           ["dataset.tag: ", f"unknown tag 'v9.9.9' in {dataset_repo}", "(tags: v1.0.0, v2.0.0)"])


@pytest.mark.parametrize("case", ["unknown key", "wrong type", "missing dataset path", "unknown DVC tag"])
def test_bad_config_is_one_line_and_changes_nothing(published, tiny_fashion_repo, case):
    name, cfg, fragments = next(c for c in _bad_configs(tiny_fashion_repo) if c[0] == case)
    published.write_config(cfg)
    before = published.storage_snapshot()
    proc = published.run("cvops", "build", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert [f for f in fragments if f not in lines[0]] == [], lines[0]
    assert published.storage_snapshot() == before
    assert not (published.path / "products").exists()


def test_ploomber_build_also_refuses_a_bad_config_before_any_task(published, tiny_fashion_repo):
    cfg = base_config(dataset={"path": str(tiny_fashion_repo), "tag": "v9.9.9"})
    published.write_config(cfg)
    proc = published.run("ploomber", "build", check=False)
    assert proc.returncode != 0
    assert "unknown tag 'v9.9.9'" in proc.stdout + proc.stderr
    assert not (published.path / "products").exists()


def test_config_check_command(published, tiny_fashion_repo):
    published.write_config(base_config(dataset={"path": str(tiny_fashion_repo)}))
    proc = published.run("cvops", "config", "check")
    assert "ok" in proc.stdout
