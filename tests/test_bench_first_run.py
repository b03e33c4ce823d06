"""`bench/first_run.py` reads `make run`'s console: its parser against lines made by the functions that print them."""
import importlib.util

from cvops.pipeline.build import fmt_seconds, task_line
from cvops.settings import ServiceSettings

from conftest import REPO

spec = importlib.util.spec_from_file_location("first_run", REPO / "bench" / "first_run.py")
first_run = importlib.util.module_from_spec(spec); spec.loader.exec_module(first_run)


def test_durations_read_back_as_cvops_build_prints_them():
    for s in (0.4, 16.2, 59.9, 60.0, 167.0, 3725.0):
        assert abs(first_run.seconds_of(fmt_seconds(s)) - s) < 1.0, (s, fmt_seconds(s))


def test_a_make_run_console_is_split_into_its_parts():
    printed = ["installing the Python environment into .venv (log: var/install.log) ... done in 38 s (uv)",
               "v1.0.0 images: 100%|##########| 60000/60000 [00:16<00:00, 3705.09it/s]",
               "dataset built: /tmp/x/datasets/fashion-mnist tags v1.0.0, v2.0.0 images {'train': 55000, 'valid': 3000, 'test': 2000}",
               "building the pipeline with configs/config.yaml (a task runs when its code, parameters or inputs changed)",
               task_line("prepare_data", 16.2), task_line("validate_data", 28.1),
               f"  {'train':<16} epoch 1/12  val_accuracy 0.7693  val_loss 1.0095  ({fmt_seconds(25.6)})",
               f"  {'train':<16} epoch 2/12  val_accuracy 0.8947  val_loss 0.7569  ({fmt_seconds(71.0)})",
               task_line("train", 167.0), task_line("deploy", 11.2),
               f"pipeline built in {fmt_seconds(256.0)}: 7 of 7 tasks ran",
               "  test accuracy:      0.9245 (products/fashion_mnist_cnn/evaluate/metrics.json)",
               "started (pid 10147, log /tmp/x/var/service.log): http://127.0.0.1:8000/  API docs http://127.0.0.1:8000/docs"]
    times = [40.0, 60.0, 100.0, 101.0, 117.0, 145.0, 171.0, 242.0, 313.0, 340.0, 357.0, 357.5, 368.0]
    parts = first_run.parse_run(list(zip(times, printed)))
    assert parts["install_s"] == 38.0 and parts["dataset_s"] == 60.0
    assert parts["tasks_s"] == {"prepare_data": 16.2, "validate_data": 28.1, "train": 167.0, "deploy": 11.2}
    assert parts["epochs_s"] == [25.6, 71.0]
    assert parts["pipeline_s"] == 256.0 and parts["test_accuracy"] == 0.9245 and parts["service_start_s"] == 11.0
    assert first_run.noise_lines(list(zip(times, printed))) == []


def test_library_noise_is_counted_and_targets_judged():
    noisy = ["2026-11-27 15:36:03.667987: E external/local_xla/xla/stream_executor/cuda/cuda_fft.cc:477] Unable to register cuFFT factory",
             "E0000 00:00:1795793763.682136    8496 cuda_dnn.cc:8310] Unable to register cuDNN factory",
             "DAG render with warnings", "/x/site-packages/keras/src/trainers/epoch_iterator.py:107: UserWarning: Your input ran out of data"]
    assert first_run.noise_lines([(0, line) for line in noisy + ["  train            ran in 2 min 47 s"]]) == noisy
    judged = first_run.judge({"make_run_s": 384.5, "train_task_s": 181.0, "test_accuracy": 0.92, "noop_rebuild_s": 3.0, "noise_lines": 0})
    assert {k: v["met"] for k, v in judged.items()} == {"make_run_s": True, "train_task_s": False, "test_accuracy": True,
                                                       "noop_rebuild_s": False, "noise_lines": True}


def test_the_clone_gets_none_of_the_callers_cvops_settings(tmp_path, monkeypatch):
    for name in ("DB_URL", "CVOPS_CENTRAL_STORAGE", "LOG_DURABILITY", "MONITOR_WEBHOOK_URL", "CVOPS_ENV"):
        monkeypatch.setenv(name, "set by the caller")
    monkeypatch.setenv("HOME_LIKE_SETTING", "kept")
    env = first_run.clean_env(tmp_path, warm_cache=False, port=12345)
    assert not {"DB_URL", "CVOPS_CENTRAL_STORAGE", "LOG_DURABILITY", "MONITOR_WEBHOOK_URL", "CVOPS_ENV"} & set(env)
    assert env["HOME_LIKE_SETTING"] == "kept" and env["SERVICE_PORT"] == "12345"
    assert env["UV_CACHE_DIR"] == str(tmp_path / "uv-cache") and env["PIP_CACHE_DIR"] == str(tmp_path / "pip-cache")
    assert "SERVICE_PORT" in {c for f in ServiceSettings.model_fields.values() for c in getattr(f.validation_alias, "choices", [])}
