"""The shipped configs: both validate, and the larger-model config differs from the default only where it says."""
from pathlib import Path

import yaml

from cvops.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_the_larger_model_config_differs_from_the_default_only_in_the_model_and_its_training():
    default, large = (load_config(CONFIGS / f).model_dump(mode="json", by_alias=True) for f in ("config.yaml", "config.large.yaml"))
    for section in default:
        if section not in ("model", "train"): assert large[section] == default[section], section
    assert {k for k in default["model"] if large["model"][k] != default["model"][k]} == {"model_name", "architecture"}
    assert large["model"]["architecture"]["conv_filters"] != default["model"]["architecture"]["conv_filters"]
    changed_train = {k for k in default["train"] if large["train"][k] != default["train"][k]}
    assert changed_train <= {"epochs", "batch_size", "learning_rate", "lr_schedule", "label_smoothing", "early_stopping_patience"}, changed_train


def test_the_larger_model_config_says_how_to_use_it():
    head = (CONFIGS / "config.large.yaml").read_text().split("\nmodel:")[0]
    assert "cvops build --config configs/config.large.yaml" in head
    assert yaml.safe_load((CONFIGS / "config.large.yaml").read_text())["model"]["model_name"] != \
        yaml.safe_load((CONFIGS / "config.yaml").read_text())["model"]["model_name"]
