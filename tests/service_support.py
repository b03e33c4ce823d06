"""Helpers for tests of the prediction service: a small trained Fashion-MNIST model published
into a throw-away central storage, the real service (`cvops serve`: gunicorn + uvicorn workers)
started on a free port on 127.0.0.1 and stopped by the test, and a throw-away PostgreSQL."""
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests

BIN = Path(sys.executable).parent
ADMIN_TOKEN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encode(img: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    from PIL import Image
    b = io.BytesIO()
    Image.fromarray(img).save(b, fmt, **kw)
    return b.getvalue()


class Service:
    "The real service as a user runs it: `cvops serve` in its own process group."

    def __init__(self, root: Path, workers: int = 2, db_url: str | None = None, env: dict | None = None):
        self.root, self.port = Path(root), free_port()
        self.log_path = self.root / f"service-{self.port}.log"
        self.env = {**os.environ, "CVOPS_ROOT": str(self.root), "SERVICE_PORT": str(self.port),
                    "SERVICE_WORKERS": str(workers), "ADMIN_TOKEN": ADMIN_TOKEN, "RELOAD_INTERVAL": "0.5",
                    "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
        self.env.pop("CVOPS_CENTRAL_STORAGE", None)
        self.env.pop("MLFLOW_TRACKING_URI", None)
        if db_url: self.env["DB_URL"] = db_url
        else: self.env.pop("DB_URL", None)
        self.proc = None

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self, wait_for: str = "/health", timeout: float = 120):
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(BIN / "cvops"), "serve"], cwd=self.root, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the service exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                if requests.get(self.url(wait_for), timeout=2).status_code == 200: return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"the service did not answer {wait_for} within {timeout} s:\n{self.read_log()}")

    def wait_workers_ready(self, version: str | None = None, timeout: float = 60):
        "Until every worker (tried by several requests) reports ready (and serves `version`)."
        deadline = time.time() + timeout
        while time.time() < deadline:
            seen = [requests.get(self.url("/models/current"), timeout=5).json() for _ in range(12)]
            if all(s["version"] and (version is None or s["version"] == version) for s in seen): return
            time.sleep(0.3)
        raise AssertionError(f"workers not serving {version}: {seen}")

    def read_log(self) -> str:
        return self.log_path.read_text()[-8000:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 40):
        if self.proc is None or self.proc.poll() is not None: return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try: self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL); self.proc.wait(10)
        self.log.close()

    def deploy(self, model_name: str, version: str | None = None, token: str = ADMIN_TOKEN):
        return requests.put(self.url("/models/current"), json={"model_name": model_name, "version": version},
                            headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def predict(self, data: bytes, filename="x.png", content_type="image/png", heatmap=True, timeout=30):
        return requests.post(self.url("/predict") + ("" if heatmap else "?heatmap=false"),
                             files={"file": (filename, data, content_type)}, timeout=timeout)


def train_small_model(root: Path, seed: int = 0, n_train: int = 3000, epochs: int = 2):
    "A small CNN trained on Fashion-MNIST arrays, saved as training saves it; returns (folder, test images, test labels, accuracy)."
    from cvops.config import ModelConfig
    from cvops.dataset import load_default_source
    from cvops.model import build_model, compile_model
    from cvops.train import save_trained_model
    src = load_default_source()
    cfg = ModelConfig(model_name="fashion_small", input_size=dict(w=28, h=28), channels=1,
                      architecture=dict(conv_filters=[16, 32], dense_units=[64], batch_norm=False, dropout=0.0, pooling="flatten"))
    x, y = src.train[0][:n_train], src.train[1][:n_train]
    k = len(src.classes)
    model = compile_model(build_model(cfg, k, seed=seed), cfg, "adam", 2e-3)
    model.fit(x[..., None].astype("float32") / 255, np.eye(k)[y], epochs=epochs, batch_size=64, verbose=0)
    xt, yt = src.test[0][:500], src.test[1][:500]
    acc = float((np.asarray(model(xt[..., None].astype("float32") / 255)).argmax(1) == yt).mean())
    folder = save_trained_model(model, root / f"trained-{seed}", cfg, src.classes)
    return folder, xt, yt, acc


def publish(storage: Path, folder: Path, accuracy: float, name: str = "fashion_small") -> str:
    from cvops.publish import publish_model
    meta = {"model_name": name, "model": {"model_name": name}, "metrics": {"accuracy": accuracy, "n_images": 500}, "lineage": {}}
    return publish_model(folder, meta, storage)["version"]


def start_postgres(base: Path):
    "A throw-away PostgreSQL cluster (initdb + pg_ctl) on a free port; returns (url, stop, start)."
    pgbin = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip() or "/usr/lib/postgresql/15/bin")
    initdb = shutil.which("initdb") or str(pgbin / "initdb")
    pg_ctl = shutil.which("pg_ctl") or str(pgbin / "pg_ctl")
    data, port = base / "pgdata", free_port()
    user = {} if os.geteuid() != 0 else {"user": "postgres"}
    def run(*args):
        cmd = list(args)
        if os.geteuid() == 0: cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=True)
    base.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0: shutil.chown(base, "postgres")
    run(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = lambda: run(pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "pg.log"), "-w", "start")
    stop = lambda: run(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
    start()
    return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres", stop, start
