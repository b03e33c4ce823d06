"""Shared fixtures: throw-away cvops projects (pipeline.yaml + pipeline notebooks + a config)
that run the real pipeline in subprocesses, as a user would."""
import base64
import io
import json
import os
import re
import signal
import time
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from cvops.cpu import use_cpu_kernels

use_cpu_kernels()   # for the kernels, services and pipelines the tests start (this process may have loaded numpy already)

from cvops.testing import Service, free_port, need, postgres_bindir, publish_version, service_project, start_postgres, train_small_model

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The longest files, longest first (`--durations` in `make test`'s output lists them). `make test` hands files to its two
# workers in collection order, one at a time each, so a long file handed out last would leave one worker running it alone.
LONGEST_FIRST = ("tests/test_pipeline_e2e.py", "tests/test_stack_rehearsal.py", "tests/test_pipeline_airflow.py",
                 "tests/test_closed_loop_e2e.py")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    "Put LONGEST_FIRST's files first, in its order; the rest keep theirs (a stable sort)."
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def base_config(**sections):
    "A small config for tests; keyword arguments replace or extend sections."
    cfg = {
        "model": {"model_name": "test_model", "input_size": {"w": 28, "h": 28}, "channels": 1,
                  "architecture": {"conv_filters": [8, 16], "pooling": "flatten", "dense_units": [32],
                                   "batch_norm": False, "dropout": 0.0}},
        "dataset": {"name": "fashion-mnist-tiny", "path": "datasets/fm", "tag": "v2.0.0", "dvc_checkout": True},
        "validate": {"n_samples": 100, "blocking_checks": ["Label Drift"]},
        "train": {"epochs": 1, "batch_size": 32, "learning_rate": 0.002, "experiment": "tests"},
        "evaluate": {"split": "test", "batch_size": 64},
        "deploy": {"min_test_accuracy": 0.0},
        "monitor": {"reference_size": 100, "permutations": 100},
    }
    for name, value in sections.items():
        cfg[name] = {**cfg.get(name, {}), **value} if isinstance(value, dict) else value
    return cfg


class Project:
    "A cvops project folder made from this repository's pipeline and a given config."

    def __init__(self, path: Path):
        self.path = path
        self.env = {**os.environ, "PLOOMBER_STATS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2",
                    "DISABLE_DEEPCHECKS_ANONYMOUS_TELEMETRY": "True", "DVC_NO_ANALYTICS": "1"}
        for var in ("MLFLOW_TRACKING_URI", "CVOPS_CENTRAL_STORAGE", "CVOPS_ROOT"):
            self.env.pop(var, None)

    def write_config(self, cfg: dict, name="configs/config.yaml") -> Path:
        p = self.path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return p

    def run(self, *args, check=True, timeout=900) -> subprocess.CompletedProcess:
        "Run a command of the venv (`cvops`, `ploomber`) in the project folder."
        proc = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=self.path, env=self.env, text=True,
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
        return proc

    def products(self, model_name="test_model") -> Path:
        "Where the pipeline keeps the products of `model_name`: products/<model_name>/<task>/."
        return self.path / "products" / model_name

    def storage_snapshot(self) -> dict:
        "Every path under central_storage with its size (to prove nothing changed)."
        root = self.path / "central_storage"
        return {p.relative_to(root).as_posix(): (p.stat().st_size if p.is_file() else None)
                for p in sorted(root.rglob("*"))} if root.exists() else {}

    def ran_tasks(self, output: str) -> dict:
        "{task: ran?} from `cvops build`'s task lines (`  name  ran in 3.1 s`, `  name  up to date`) or Ploomber's build table."
        table = {}
        for line in output.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1] in ("True", "False"):
                table[parts[0]] = parts[1] == "True"
            elif line.startswith("  ") and parts[1:3] in (["ran", "in"], ["up", "to"]):
                table[parts[0]] = parts[1] == "ran"
        return table


@pytest.fixture
def project(tmp_path) -> Project:
    "An empty project: pipeline.yaml, the pipeline notebooks, env.yaml -> configs/config.yaml."
    root = tmp_path / "project"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy(REPO / "pipeline.yaml", root / "pipeline.yaml")
    shutil.copytree(REPO / "notebooks" / "pipeline", root / "notebooks" / "pipeline")
    (root / "configs").mkdir()
    (root / "env.yaml").symlink_to("configs/config.yaml")
    for sub in ("models", "ref_data"):
        (root / "central_storage" / sub).mkdir(parents=True)
    return Project(root)


@pytest.fixture(scope="session")
def tiny_fashion_repo(tmp_path_factory) -> Path:
    "A tiny Fashion-MNIST dataset repo (git + DVC, tags v1.0.0 / v2.0.0), built once per session."
    from cvops.data.dataset import build_dataset_repo
    base = tmp_path_factory.mktemp("fm")
    build_dataset_repo(base / "fm", base / "remote", n_train=400, n_valid=100, n_test=200, progress=False)
    return base / "fm"


# --- the prediction service -------------------------------------------------------------------
@pytest.fixture(scope="session")
def trained_models(tmp_path_factory):
    "Two small Fashion-MNIST models (different seeds), trained once per session, with 500 test images."
    base = tmp_path_factory.mktemp("trained")
    return {"a": train_small_model(base, seed=0), "b": train_small_model(base, seed=1)}


@pytest.fixture
def service_root(tmp_path, trained_models):
    """A project folder for the service: central storage with model `fashion_small` published
    twice (versions a and b, a deployed) and one corrupt version published last."""
    root = service_project(tmp_path / "svc")
    storage = root / "central_storage"
    a, b = trained_models["a"], trained_models["b"]
    va = publish_version(storage, a.folder, "fashion_small", a.accuracy)
    time.sleep(0.01)
    vb = publish_version(storage, b.folder, "fashion_small", b.accuracy)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(b.folder, corrupt)
    (corrupt / "model.keras").write_bytes(b"this is not a keras file")
    time.sleep(0.01)
    vc = publish_version(storage, corrupt, "fashion_small", b.accuracy)
    from cvops.registry.deploy import deploy
    deploy(storage, "fashion_small", va, by="tests")
    return {"root": root, "storage": storage, "a": va, "b": vb, "corrupt": vc}


@pytest.fixture
def service_factory():
    "Start real services (`cvops serve`); every one is stopped when the test ends, pass or fail."
    started = []
    def make(root, **kw) -> Service:
        svc = Service(root, **kw)
        started.append(svc)
        return svc.start()
    yield make
    for svc in started:
        svc.stop()


@pytest.fixture
def pg(tmp_path):
    "A throw-away PostgreSQL cluster (initdb + pg_ctl on a free port), stopped and removed when the test ends, pass or fail."
    if postgres_bindir() is None:
        need("PostgreSQL server programs (initdb, pg_ctl)", "apt-get install postgresql")
    cluster = start_postgres(tmp_path / "pg")
    yield cluster
    cluster.remove()


# --- the Voila dashboards (`make dashboard`) ----------------------------------------------------------
class Voila:
    "`voila notebooks/dashboards` as `make dashboard` runs it, on a free port; stopped (process group) pass or fail."

    def __init__(self, root: Path, log_path: Path):
        self.port, self.log_path = free_port(), log_path
        env = {**os.environ, "CVOPS_ROOT": str(root), "TF_CPP_MIN_LOG_LEVEL": "3"}
        for var in ("DB_URL", "CVOPS_CENTRAL_STORAGE", "MLFLOW_TRACKING_URI"): env.pop(var, None)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([str(BIN / "voila"), "notebooks/dashboards", "--no-browser", f"--port={self.port}",
                                      "--Voila.ip=127.0.0.1"], cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def url(self, path="/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None: raise AssertionError(f"voila exited {self.proc.returncode}:\n{self.read_log()}")
            try:
                if requests.get(self.url("/"), timeout=2).status_code == 200: return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise AssertionError(f"voila did not answer within {timeout} s:\n{self.read_log()}")

    def read_log(self) -> str:
        return self.log_path.read_text()[-6000:] if self.log_path.exists() else ""

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try: self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL); self.proc.wait(10)
        self.log.close()


@pytest.fixture
def voila_factory(tmp_path):
    started = []
    def start(root: Path) -> Voila:
        v = Voila(root, tmp_path / f"voila-{len(started)}.log")
        started.append(v)
        return v.wait()
    yield start
    for v in started: v.stop()


def cell_outputs(html: str) -> list[dict]:
    "The cell outputs Voila embeds in the page (rendered by its front end)."
    blocks = re.findall(r'<script type="application/vnd\.voila\.cell-output\+json">\s*(.*?)\s*</script>', html, re.S)
    return [json.loads(b) for b in blocks]


def check_rendered_html(html: str, what: str) -> list[dict]:
    "No error output, no stderr, no traceback; returns the outputs."
    outs = cell_outputs(html)
    assert outs, f"{what}: no cell outputs in the page"
    errors = [o for o in outs if o.get("output_type") == "error"]
    assert not errors, f"{what}: error outputs {[(e.get('ename'), e.get('evalue')) for e in errors]}"
    noise = [o.get("text") for o in outs if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    assert not noise, f"{what}: stderr in the page: {noise}"
    assert "Traceback" not in html and "There was an error when executing cell" not in html, f"{what}: a traceback in the page"
    return outs


def pngs(outs) -> list:
    from PIL import Image
    return [Image.open(io.BytesIO(base64.b64decode(o["data"]["image/png"]))) for o in outs if "image/png" in o.get("data", {})]


def text_of(outs) -> str:
    return "\n".join(str(o.get("data", {}).get(k, "")) for o in outs for k in ("text/markdown", "text/html"))
