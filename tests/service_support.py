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
import threading
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
    from cvops.data.dataset import load_default_source
    from cvops.training.model import build_model, compile_model
    from cvops.training.model import save_trained_model
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


class PredictionLoad:
    """Predictions from `n` threads until stopped: (start time, status or None for a cut connection, request id or the
    error) per request. `heatmap`: True, False or "alternate"."""

    def __init__(self, svc, images, n=4, heatmap=False):
        self.svc, self.images, self.n, self.heatmap = svc, images, n, heatmap
        self.results, self._stop, self._lock = [], threading.Event(), threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(n)]

    def _run(self, k):
        i = k
        while not self._stop.is_set():
            t = time.monotonic()
            heatmap = bool(i % 2) if self.heatmap == "alternate" else self.heatmap
            try:
                r = self.svc.predict(self.images[i % len(self.images)], heatmap=heatmap, timeout=20)
                body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                res = (t, r.status_code, body.get("request_id") if r.status_code == 200 else body.get("error", r.text[:300]))
            except Exception as e:   # a refused or reset connection (a killed worker): not acknowledged
                res = (t, None, f"{type(e).__name__}: {e}")
            with self._lock: self.results.append(res)
            i += self.n

    def ok_ids(self) -> set:
        return {r[2] for r in self.results if r[1] == 200}

    def __enter__(self):
        for t in self.threads: t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self.threads: t.join(30)


def monitor_project(root: Path, monitor: dict) -> Path:
    "A project folder with the monitoring pipeline and a config whose `monitor` section is `monitor`."
    import yaml
    repo = Path(__file__).resolve().parents[1]
    (root / "central_storage" / "models").mkdir(parents=True)
    (root / "pipeline.yaml").write_text("tasks: []\n")
    shutil.copy(repo / "pipeline.monitor.yaml", root / "pipeline.monitor.yaml")
    shutil.copytree(repo / "notebooks" / "monitor", root / "notebooks" / "monitor")
    (root / "configs").mkdir()
    (root / "configs" / "config.yaml").write_text(yaml.safe_dump({"monitor": monitor}))
    return root


def monitor_env(root: Path, webhook_url: str) -> dict:
    "The environment `cvops monitor` runs in for a test project: its root, a webhook, no settings of the caller's machine."
    env = {**os.environ, "CVOPS_ROOT": str(root), "MONITOR_WEBHOOK_URL": webhook_url, "PLOOMBER_STATS_ENABLED": "false",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    for var in ("DB_URL", "CVOPS_CENTRAL_STORAGE", "MLFLOW_TRACKING_URI", "MONITOR_INTERVAL"):
        env.pop(var, None)
    return env


def publish(storage: Path, folder: Path, accuracy: float, name: str = "fashion_small") -> str:
    from cvops.registry.publish import publish_model
    meta = {"model_name": name, "model": {"model_name": name}, "metrics": {"accuracy": accuracy, "n_images": 500}, "lineage": {}}
    return publish_model(folder, meta, storage)["version"]


def postgres_bindir() -> Path | None:
    "Where Debian's (or any) PostgreSQL server programs are: initdb and pg_ctl on PATH, pg_config's bindir, /usr/lib/postgresql/*/bin."
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        return Path(shutil.which("initdb")).parent
    dirs = []
    if shutil.which("pg_config"):
        dirs.append(Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()))
    dirs += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda d: d.parent.name, reverse=True)
    for d in dirs:
        if (d / "initdb").exists() and (d / "pg_ctl").exists(): return d
    return None


class PostgresCluster:
    """A throw-away PostgreSQL cluster (initdb + pg_ctl) on a free port of 127.0.0.1, trust auth.

    It lives in its own short folder under the system temp dir (sockets have a ~100-char path limit,
    and pytest's tmp folders are private to root); as root, every pg program runs as the `postgres`
    OS user and that folder is owned by it. `remove()` stops it (if running) and deletes the folder;
    the server log is copied to `base` first. Never touches the machine's own cluster."""

    def __init__(self, base: Path):
        import tempfile
        bindir = postgres_bindir()
        if bindir is None: raise FileNotFoundError("initdb/pg_ctl not found (Debian: apt-get install postgresql)")
        self.initdb, self.pg_ctl = str(bindir / "initdb"), str(bindir / "pg_ctl")
        self.base = Path(base); self.base.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="cvops-pg-"))
        self.data, self.logfile, self.port = self.dir / "data", self.dir / "pg.log", free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root: shutil.chown(self.dir, "postgres", "postgres")
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")

    def _run(self, *args, check=True, timeout=60):
        cmd = ["runuser", "-u", "postgres", "--", *args] if self.as_root else list(args)
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=self.dir, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise RuntimeError(f"{args[0]} {args[1:]} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}\n{self.server_log()}")
        return p

    def server_log(self) -> str:
        try: return self.logfile.read_text()[-4000:]
        except OSError: return ""

    def start(self):
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
        self._run(self.pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.logfile), "-w", "-t", "30", "start")
        return self

    def stop(self, mode: str = "fast"):
        self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def running(self) -> bool:
        return self._run(self.pg_ctl, "-D", str(self.data), "status", check=False).returncode == 0

    def remove(self):
        if self.data.exists() and self.running(): self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        try: shutil.copy(self.logfile, self.base / "pg.log")
        except OSError: pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def __iter__(self):  # url, stop, start = start_postgres(base)
        return iter((self.url, self.stop, self.start))


def start_postgres(base: Path) -> PostgresCluster:
    "A throw-away PostgreSQL cluster, started; `url, stop, start = start_postgres(base)` works too. Call `.remove()` when done."
    pg = PostgresCluster(base)
    try: return pg.start()
    except BaseException:
        pg.remove(); raise


def headless_chromium(tmp_path: Path, window: str = "1100,900", page_load_timeout: float = 30):
    """Headless Chromium through Debian's chromedriver (never a downloaded browser); yields the
    driver and quits it. Missing Chromium or selenium: fail under CI=true, skip otherwise."""
    import pytest
    in_ci = os.environ.get("CI") == "true"
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        msg = f"chromium ({chromium}) and chromedriver ({driver_path}) are needed: apt-get install chromium chromium-driver"
        if in_ci: pytest.fail(msg)
        pytest.skip(msg)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service as DriverService
    except ImportError as e:
        if in_ci: pytest.fail(f"selenium is not installed: {e}")
        pytest.skip(f"selenium is not installed: {e}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-dev-shm-usage", f"--window-size={window}", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    service = DriverService(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    drv = webdriver.Chrome(service=service, options=opts)  # a given executable_path: selenium-manager is not used
    drv.set_page_load_timeout(page_load_timeout)
    try: yield drv
    finally: drv.quit()
