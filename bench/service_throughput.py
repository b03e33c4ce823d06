"""Prediction-service throughput: the real service over HTTP vs the same work in-process, and the prediction log.

1. service   `cvops serve` (gunicorn + 2 uvicorn workers, SQLite prediction log, image store) on a free
             127.0.0.1 port, fed real Fashion-MNIST test images (28x28 PNG) by a bounded load generator at
             concurrency 1 and 8, heatmaps on and off, in both ways a client can send an image: `raw` (the PNG as the
             request body, Content-Type image/png: the documented fast path, on which the targets are judged) and
             `multipart` (a form's `file` field, as browsers and `curl -F` send it).
             The load generator: one thread per connection (keep-alive), each sending pre-built HTTP/1.1 request
             bytes over a plain socket and reading the answer by its Content-Length (no HTTP library: about 20 us of
             client CPU per request); it shares the machine's cores with the service, so its CPU is measured and
             reported (`load_generator`: cores, share of the CPU used during the cells, us per request).
             Per cell: warm-up, then a fixed window; requests/s = responses completed in the window / window.
2. in-process  the same decode -> model (+ GradCAM) -> overlay PNG path (check_upload, prepare_input or, for a batch
             without heatmaps, prepare_batch as the service's batcher, LoadedVersion call, class_probabilities,
             render_heatmap when heatmaps are on) in a loop, in as many processes as the service has workers
             (multiprocessing spawn), each with TensorFlow's intra/inter op threads = cores / workers as the service's
             workers use, at batch 1 and batched by 8.
             ratio = service / in-process: concurrency 1 against batch 1, concurrency 8 against the better of
             batch 1 and batch 8 (the batched figure). Beside it, for reading, not judged: heatmaps off at batch
             concurrency / workers (4), the images 8 clients keep in flight, where batch 8 in each of 2 processes holds 16.
   ceiling     bench/bare_server.py (an ASGI app that reads the body and answers a fixed JSON body of the service's
             answer size) under the same gunicorn worker class and worker count, loaded the same way: what any Python
             service on this HTTP stack and these cores can reach, with no model and no logging; the output says
             what share of it 0.6 of the in-process figure is.
   Service and in-process cells alternate (never run at the same time: they would share the cores), for
   `--rounds` rounds; the figures reported are medians over the rounds.
   The targets (issue 13), on the raw-body path, from the same run: heatmaps off at concurrency 8 >= 0.6 of the batched
   in-process figure, heatmaps on >= 0.7, and p99 at concurrency 1 with heatmaps off < 10 ms (`targets` in the JSON).
3. predlog   rows/s that cvops.predlog.writer.PredictionLog writes (one row = one request: its api_log row and its
             predictions row with 10 class probabilities and a 40-float feature head), queued up front and
             timed until the writer thread has written them all, to SQLite (a file in a temp folder) and
             PostgreSQL (127.0.0.1:5432, user postgres, a temp database created and dropped; "unavailable" and
             the reason when it cannot be reached), without and with the image store; compared with the
             service's best request rate (target >= 10x).
4. durability  the service as in 1 (LOG_DURABILITY=durable, the default: rows fsynced to a write-ahead log before the
             answer) against a second one with LOG_DURABILITY=async (rows queued in memory), heatmaps off, raw body,
             concurrency 1 and 8, cells alternating; req/s, p50/p99 and the ratio durable / async (target: durable costs
             <= 15 % at concurrency 8). `--only-durability` runs this part alone.

The model: the project's deployed one (central_storage/deployments/current.json, after `make run`) copied into
a temp central storage; otherwise one trained for the bench (the config's model section, one epoch on 3000
Fashion-MNIST images, cvops.testing.train_small_model), published and deployed there.
The service is stopped at the end, pass or fail; results go to --out (JSON) and a table on stdout.

    python bench/service_throughput.py [--duration 8] [--warmup 2] [--rounds 2] [--out bench/results/service_throughput.json]
"""
import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from cvops.testing import Service  # noqa: E402  (no TensorFlow: it loads nothing heavy)

TARGET_RATIO = {"heatmap_off": 0.6, "heatmap_on": 0.7}   # service at concurrency 8 / the batched in-process figure
TARGET_P99_C1_MS = 10.0                                  # heatmaps off, concurrency 1
TARGET_LOG_RATIO = 10.0
STYLES = ("raw", "multipart")                            # how the image is sent; the targets are judged on "raw"


# --- the model ----------------------------------------------------------------------------------
def _train_and_deploy(config_path: str, storage: str, n_train: int = 3000, epochs: int = 1) -> dict:
    "In a child process: train the config's model briefly on Fashion-MNIST, publish and deploy it into `storage`."
    from cvops.quiet import quiet_tensorflow
    quiet_tensorflow()   # TensorFlow's CUDA start-up lines stay out of the bench's output
    import yaml
    from cvops.config import ModelConfig
    from cvops.testing import tiny_version, train_small_model
    cfg = ModelConfig.model_validate(yaml.safe_load(Path(config_path).read_text())["model"])
    trained = train_small_model(Path(storage).parent, 0, n_train, epochs, cfg)
    tiny_version(storage, trained=trained, detectors=False, deploy=True, by="bench")
    return {"accuracy_500_test_images": trained.accuracy, "trained_on": n_train, "epochs": epochs}


def prepare_storage(project_root: Path, work: Path, config_path: Path) -> dict:
    "A temp project folder for the service whose central storage holds one deployed version; returns what it is."
    from cvops.registry.versions import POINTER_FILE, current_deployment, resolve_version
    from cvops.testing import service_project
    storage = service_project(work) / "central_storage"
    (storage / "models" / ".versions").mkdir()
    src_storage = project_root / "central_storage"
    rec = current_deployment(src_storage)
    if rec is not None:
        version, folder = resolve_version(src_storage, rec["model_name"], rec["version"])
        shutil.copytree(folder, storage / "models" / ".versions" / version)
        shutil.copy2(src_storage / "models" / f"{rec['model_name']}.yaml", storage / "models" / f"{rec['model_name']}.yaml")
        (storage / "deployments").mkdir()
        (storage / POINTER_FILE).write_text(json.dumps(rec))
        source = {"source": f"deployed in {src_storage} (copied to a temp central storage)"}
    else:
        import concurrent.futures as cf
        with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
            trained = ex.submit(_train_and_deploy, str(config_path), str(storage)).result()
        rec = current_deployment(storage)
        source = {"source": f"no deployment in {src_storage}: the model section of {config_path.name} trained for the bench, "
                            "published and deployed in a temp central storage", **trained}
    _, folder = resolve_version(storage, rec["model_name"], rec["version"])
    from cvops.training.model import read_model_info
    info = read_model_info(folder)
    return {"model_name": rec["model_name"], "version": rec["version"], "folder": str(folder), **source,
            "input": [info["model"]["input_size"]["h"], info["model"]["input_size"]["w"], info["model"]["channels"]],
            "architecture": info["model"].get("architecture"), "classes": len(info["classes"])}


def request_bodies(n: int):
    "n test images (PNG) and, per way of sending them (`STYLES`), their request bodies and Content-Type."
    images = test_images(n)
    boundary = uuid.uuid4().hex
    return images, {"raw": (images, "image/png"),
                    "multipart": ([multipart(d, boundary) for d in images], f"multipart/form-data; boundary={boundary}")}


def test_images(n: int) -> list:
    "The first `n` Fashion-MNIST test images, PNG-encoded (as a client would upload them)."
    from cvops.data.dataset import load_default_source
    from cvops.testing import encode
    return [encode(a) for a in load_default_source().test[0][:n]]


# --- the in-process limit ---------------------------------------------------------------------------
def _limit_worker(folder: str, images: list, threads: int, cmds, results):
    "One process of the in-process limit: load the version, then run the cells the parent sends."
    from cvops.quiet import quiet_tensorflow
    tf = quiet_tensorflow()
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import numpy as np
    from cvops.registry.deploy import check_version
    from cvops.serving.inference import (check_upload, class_probabilities, load_for_serving, prepare_batch, prepare_input,
                                         render_heatmap)
    from cvops.training.model import load_keras_model
    lv = check_version(folder, load_for_serving)
    params = load_keras_model(folder).count_params()
    results.put(("ready", os.getpid(), params))
    k = 0
    while True:
        cmd = cmds.get()
        if cmd is None: return
        heatmap, batch, t_start, warm, dur = cmd
        while time.time() < t_start: time.sleep(0.001)
        t0 = time.perf_counter() + warm; t1 = t0 + dur
        n, lat, stages = 0, [], [0.0, 0.0, 0.0, 0.0]   # decode, prepare, model, render
        cpu0 = time.process_time()
        while True:
            a = time.perf_counter()
            if a >= t1: break
            datas = [images[(k + i) % len(images)] for i in range(batch)]; k += batch
            ups = [check_upload(d, "image/png") for d in datas]
            b = time.perf_counter()
            if heatmap or batch == 1:   # as the service's batcher: image by image (a display copy for heatmaps), else one call
                x = np.stack([prepare_input(u, lv, 1024 if heatmap else None) for u in ups])
            else:
                x = prepare_batch(ups, lv)
            c = time.perf_counter()
            out = lv(x, heatmap=heatmap)
            d = time.perf_counter()
            for i, u in enumerate(ups):
                class_probabilities(out["probs"][i], lv.classes)
                if heatmap: render_heatmap(out["cam"][i], u.display)
            e = time.perf_counter()
            if a >= t0:
                n += batch; lat.append(e - a)
                for j, s in enumerate((b - a, c - b, d - c, e - d)): stages[j] += s
        results.put(("done", os.getpid(), n, lat, stages, time.process_time() - cpu0))


class InProcessLimit:
    def __init__(self, folder: str, images: list, processes: int, threads: int):
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.cmds = [ctx.Queue() for _ in range(processes)]
        self.procs = [ctx.Process(target=_limit_worker, args=(folder, images, threads, q, self.results), daemon=True)
                      for q in self.cmds]
        for p in self.procs: p.start()

    def wait_ready(self, timeout=180) -> int:
        got = [self.results.get(timeout=timeout) for _ in self.procs]
        return got[0][2]

    def cell(self, heatmap: bool, batch: int, warm: float, dur: float) -> dict:
        t_start = time.time() + 0.3
        j0, w0 = machine_jiffies(), time.perf_counter()
        for q in self.cmds: q.put((heatmap, batch, t_start, warm, dur))
        got = [self.results.get(timeout=warm + dur + 120) for _ in self.procs]
        machine, ours = cores_busy(j0, machine_jiffies()), sum(g[5] for g in got) / (time.perf_counter() - w0)
        n = sum(g[2] for g in got)
        lat = sorted(x for g in got for x in g[3])
        steps = len(lat) or 1
        stages = [sum(g[4][j] for g in got) / steps * 1000 for j in range(4)]
        return {"img_s": n / dur, "images": n,
                "step_ms_p50": _pct(lat, 50) * 1000 if lat else None, "step_ms_p99": _pct(lat, 99) * 1000 if lat else None,
                "step_ms_mean_by_stage": dict(zip(("check_upload", "prepare_input_or_batch", "model", "probs_and_render"), (round(s, 3) for s in stages))),
                "cpu_s_per_image": sum(g[5] for g in got) / max(n, 1),
                "cpu_cores_busy": {"in_process": round(ours, 3), "machine": None if machine is None else round(machine, 3),
                                   "other_processes": None if machine is None else round(max(0.0, machine - ours), 3)}}

    def close(self):
        for q in self.cmds: q.put(None)
        for p in self.procs:
            p.join(10)
            if p.is_alive(): p.terminate()


# --- the service -----------------------------------------------------------------------------------
def bench_service(work: Path, workers: int, version: str, durability: str = "durable", var_dir: str | None = None) -> Service:
    """`cvops serve` (cvops.testing.Service) with the service's own defaults (no admin token, the default reload interval)
    and LOG_DURABILITY=`durability`, started and serving `version` on every worker."""
    env = {"ADMIN_TOKEN": None, "RELOAD_INTERVAL": None, "LOG_DURABILITY": durability, "CVOPS_VAR_DIR": var_dir}
    return Service(work, workers, env=env, name=f"service-{durability}").start(timeout=180).wait_workers_ready(version, 180)


def machine_jiffies() -> tuple:
    "(busy, total) CPU jiffies of the whole machine, from /proc/stat ((0, 0) where there is none)."
    try:
        v = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
        return sum(v) - v[3] - v[4], sum(v)
    except (OSError, ValueError):
        return 0, 0


def cores_busy(j0, j1) -> float | None:
    "Cores busy on the whole machine between two `machine_jiffies()` readings."
    return (j1[0] - j0[0]) / (j1[1] - j0[1]) * (os.cpu_count() or 1) if j1[1] > j0[1] else None


def _pct(sorted_xs, p):
    if not sorted_xs: return None
    return sorted_xs[min(len(sorted_xs) - 1, max(0, round(p / 100 * len(sorted_xs) + 0.5) - 1))]


_TIME_MS = re.compile(rb'"time_ms":\s*([0-9.eE+-]+)')
_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)
_CLOSE = re.compile(rb"\r\nconnection:\s*close", re.I)


def http_request(port: int, path: str, body: bytes, ctype: str) -> bytes:
    "The bytes of one HTTP/1.1 POST (keep-alive), built once and sent as they are."
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def read_answer(sock, buf: bytearray) -> tuple[int, bytes, bool]:
    "(status, body, closing) of the next answer on `sock` (read by its Content-Length; what follows stays in `buf`)."
    while (end := buf.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk: raise ConnectionError("the service closed the connection")
        buf += chunk
    head = bytes(buf[:end + 2])
    m = _LENGTH.search(head)
    if m is None: raise ConnectionError(f"an answer without Content-Length: {head[:200]!r}")
    total = end + 4 + int(m.group(1))
    while len(buf) < total:
        chunk = sock.recv(max(65536, total - len(buf)))
        if not chunk: raise ConnectionError("the service closed the connection")
        buf += chunk
    body = bytes(buf[end + 4:total]); del buf[:total]
    return int(head[9:12]), body, _CLOSE.search(head) is not None


def load_cell(port: int, bodies: list, ctype: str, heatmap: bool, concurrency: int, warm: float, dur: float) -> dict:
    """`concurrency` threads, one keep-alive connection each, sending POST /predict back to back: pre-built request bytes
    over a plain socket, the answer read by its Content-Length (the load generator's own CPU per request stays small)."""
    import socket
    path = "/predict" + ("" if heatmap else "?heatmap=false")
    requests_ = [http_request(port, path, b, ctype) for b in bodies]
    start = time.perf_counter() + 0.05
    t0, t1 = start + warm, start + warm + dur
    per = [dict(lat=[], server=[], errors=0, statuses={}, bytes=0, reconnects=0) for _ in range(concurrency)]

    def connect():
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def client(i):
        rec, buf = per[i], bytearray()
        sock = connect()
        k = i * 997
        while time.perf_counter() < start: time.sleep(0.001)
        while True:
            a = time.perf_counter()
            if a >= t1: break
            req = requests_[k % len(requests_)]; k += 1
            try:
                sock.sendall(req)
                status, payload, closing = read_answer(sock, buf)
                if closing: sock.close(); buf.clear(); sock = connect(); rec["reconnects"] += 1   # the service asked: a new connection
            except OSError as e:
                rec["errors"] += 1; rec["statuses"][type(e).__name__] = rec["statuses"].get(type(e).__name__, 0) + 1
                sock.close(); buf.clear(); sock = connect()
                continue
            b = time.perf_counter()
            if t0 <= b <= t1:
                if status == 200:
                    rec["lat"].append(b - a); rec["bytes"] += len(payload)
                    m = _TIME_MS.search(payload)
                    if m: rec["server"].append(float(m.group(1)))
                else:
                    rec["errors"] += 1; rec["statuses"][status] = rec["statuses"].get(status, 0) + 1
        sock.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads: t.start()
    for t in threads: t.join(warm + dur + 120)
    lat = sorted(x for r in per for x in r["lat"])
    server = sorted(x for r in per for x in r["server"])
    n = len(lat)
    statuses = {}
    for r in per:
        for s, c in r["statuses"].items(): statuses[str(s)] = statuses.get(str(s), 0) + c
    return {"req_s": n / dur, "requests": n, "errors": sum(r["errors"] for r in per), "error_kinds": statuses,
            "reconnects_asked": sum(r["reconnects"] for r in per),
            "p50_ms": _pct(lat, 50) * 1000 if lat else None, "p99_ms": _pct(lat, 99) * 1000 if lat else None,
            "server_time_ms_p50": _pct(server, 50), "server_time_ms_mean": statistics.fmean(server) if server else None,
            "client_latency_ms_mean": statistics.fmean(lat) * 1000 if lat else None,
            "response_kb_mean": sum(r["bytes"] for r in per) / max(n, 1) / 1024}


def multipart(data: bytes, boundary: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"image.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()


def batch_stats(svc: Service) -> tuple[float, float]:
    "(images, model calls) so far, from the service's `cvops_inference_batch_images` histogram (both workers, both heatmap settings)."
    import urllib.request
    with urllib.request.urlopen(svc.url("/metrics"), timeout=10) as r: text = r.read().decode()
    total = lambda name: sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name + "{"))
    return total("cvops_inference_batch_images_sum"), total("cvops_inference_batch_images_count")


def service_cell(svc: Service, bodies, ctype, heatmap, concurrency, warm, dur) -> dict:
    "One load cell, with the CPU the service's processes and this (client) process used during it, and the mean batch."
    b0 = batch_stats(svc)
    cpu0, client0, j0, w0 = svc.cpu(), time.process_time(), machine_jiffies(), time.perf_counter()
    res = load_cell(svc.port, bodies, ctype, heatmap, concurrency, warm, dur)
    cpu1, client1, j1, w1 = svc.cpu(), time.process_time(), machine_jiffies(), time.perf_counter()
    b1 = batch_stats(svc)
    wall = w1 - w0
    per_proc = {str(pid): round((cpu1[pid] - cpu0.get(pid, 0)) / wall, 3) for pid in cpu1}
    client = (client1 - client0) / wall
    ours = sum(per_proc.values()) + client
    machine = cores_busy(j0, j1)
    res["cpu_cores_busy"] = {"service_master": per_proc.pop(str(svc.proc.pid), None), "service_workers": per_proc,
                             "load_generator": round(client, 3),
                             "machine": None if machine is None else round(machine, 3),
                             "other_processes": None if machine is None else round(max(0.0, machine - ours), 3)}
    res["load_generator_us_per_request"] = round(client / res["req_s"] * 1e6, 1) if res["req_s"] else None
    res["load_generator_share_of_busy_cpu"] = round(client / machine, 3) if machine else None
    res["service_cpu_ms_per_request"] = round(sum(per_proc.values()) / res["req_s"] * 1000, 3) if res["req_s"] else None
    res["mean_images_per_model_call"] = round((b1[0] - b0[0]) / (b1[1] - b0[1]), 2) if b1[1] > b0[1] else None
    return res


# --- the ceiling: the server alone ---------------------------------------------------------------
def bench_ceiling(workers: int, bodies, ctype, concurrencies, warm: float, dur: float, rounds: int, response_bytes: int) -> dict:
    """req/s of `bench/bare_server.py` (an ASGI app that reads the body and answers a fixed JSON body of `response_bytes`)
    under the service's gunicorn worker class with `workers` workers, loaded as the service is: what any Python service
    on this HTTP stack and these cores can reach, with no model and no logging."""
    import subprocess
    import requests
    from cvops.testing import free_port
    port = free_port()
    env = {**os.environ, "BARE_RESPONSE_BYTES": str(response_bytes)}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "-k", "cvops.serving.server.ServiceWorker",
                             "-w", str(workers), "-b", f"127.0.0.1:{port}", "--keep-alive", "5", "--log-level", "warning",
                             "--chdir", str(Path(__file__).resolve().parent), "bare_server:app"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if requests.post(f"http://127.0.0.1:{port}/predict", data=b"x", timeout=2).status_code == 200: break
            except requests.RequestException: pass
            if time.time() > deadline or proc.poll() is not None: raise RuntimeError("bench/bare_server.py did not start")
            time.sleep(0.2)
        import psutil
        def server_cpu() -> float:
            procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children()
            return sum(t.user + t.system for t in (p.cpu_times() for p in procs))
        cells, cpu_ms = {}, {}
        for rnd in range(rounds):
            for conc in concurrencies:
                c0, w0 = server_cpu(), time.perf_counter()
                r = load_cell(port, bodies, ctype, False, conc, warm, dur)
                cpu = (server_cpu() - c0) / (time.perf_counter() - w0)        # cores the server kept busy
                cells.setdefault(f"c{conc}", []).append(r["req_s"])
                cpu_ms.setdefault(f"c{conc}", []).append(cpu / r["req_s"] * 1000 if r["req_s"] else None)
                print(f"round {rnd + 1} ceiling    bare ASGI app     concurrency {conc}: {r['req_s']:7.1f} req/s  "
                      f"p50 {_f(r['p50_ms'], '.2f')} ms  server cpu {_f(cpu_ms[f'c{conc}'][-1], '.3f')} ms/req  errors {r['errors']}", flush=True)
        return {"what": "bench/bare_server.py under the service's gunicorn worker class: reads the body, answers a fixed "
                        f"{response_bytes}-byte JSON body; no model, no logging",
                "workers": workers, "req_s": {k: _median(v) for k, v in cells.items()},
                "server_cpu_ms_per_request": {k: _median(v) for k, v in cpu_ms.items()}, "raw": cells}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(20)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL)


# --- the prediction log --------------------------------------------------------------------------
def log_rows(n: int, images: list, classes: list) -> list:
    "`n` requests' rows as the service's middleware and /predict build them."
    import random
    rnd = random.Random(0)
    rows = []
    for i in range(n):
        rid = uuid.uuid4().hex
        now = datetime.now(timezone.utc)
        p = [rnd.random() for _ in classes]; s = sum(p)
        probs = {c: round(v / s, 6) for c, v in zip(classes, p)}
        api = {"request_id": rid, "created_on": now, "method": "POST", "route": "/predict", "path": "/predict",
               "status_code": 200, "latency_ms": round(rnd.uniform(5, 40), 3), "client": "127.0.0.1",
               "model_version": "fashion_mnist_cnn@20250101T000000Z", "error": None}
        pred = {"request_id": rid, "created_on": now, "model_name": "fashion_mnist_cnn",
                "model_version": "fashion_mnist_cnn@20250101T000000Z", "top_class": max(probs, key=probs.get),
                "probabilities": probs, "features": {"embedding": [round(rnd.gauss(0, 1), 6) for _ in range(40)]},
                "latency_ms": api["latency_ms"]}
        rows.append((api, pred, (images[i % len(images)], "PNG")))
    return rows


def predlog_rate(url: str, rows: list, work: Path, with_images: bool, timeout: float = 120) -> dict:
    from cvops.predlog.images import ImageStore
    from cvops.predlog.writer import PredictionLog
    from cvops.predlog.schema import make_engine, migrate
    import sqlalchemy as sa
    eng = make_engine(url)
    try:
        migrate(eng)
        with eng.begin() as c:
            for t in ("predictions", "api_log"): c.execute(sa.text(f"DELETE FROM {t}"))
        d = work / f"plog-{uuid.uuid4().hex[:8]}"
        plog = PredictionLog(eng, d / "spill", ImageStore(d / "images") if with_images else None)
        for api, pred, image in rows: plog.log(api, pred, image if with_images else None)
        t = time.perf_counter(); plog.start()
        while plog.written < len(rows) and time.perf_counter() - t < timeout:
            time.sleep(0.002)
        dt = time.perf_counter() - t
        written, failures, err = plog.written, plog.failures, plog.last_error
        plog.stop()
        with eng.connect() as c:
            counted = c.execute(sa.text("SELECT COUNT(*) FROM predictions")).scalar()
        return {"rows_s": written / dt, "rows": written, "seconds": round(dt, 3), "rows_in_table": counted,
                "write_failures": failures, **({"last_error": err} if err else {})}
    finally:
        eng.dispose()


def bench_predlog(images: list, classes: list, n: int, work: Path, pg: str) -> dict:
    rows = log_rows(n, images, classes)
    out = {"rows_per_request": "1 api_log row + 1 predictions row (10 probabilities, 40-float feature head)",
           "batch_size": 500, "rows_queued": n}
    sq = work / "predlog.sqlite"
    out["sqlite"] = {"url": f"sqlite:///{sq}",
                     "rows_only": predlog_rate(f"sqlite:///{sq}", rows, work, False),
                     "with_image_store": predlog_rate(f"sqlite:///{sq}", rows, work, True)}
    # PostgreSQL: a temp database on the machine's server
    host, port = pg.rsplit(":", 1)
    dbname = f"cvops_bench_{uuid.uuid4().hex[:8]}"
    try:
        import psycopg2
        admin = psycopg2.connect(host=host, port=int(port), user="postgres", dbname="postgres", connect_timeout=3)
    except Exception as e:
        out["postgresql"] = {"status": "unavailable", "reason": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
        return out
    admin.autocommit = True
    try:
        with admin.cursor() as c:
            c.execute(f'CREATE DATABASE "{dbname}"')
            c.execute("SHOW server_version"); version = c.fetchone()[0]
            c.execute("SHOW synchronous_commit"); sync = c.fetchone()[0]
            c.execute("SHOW fsync"); fsync = c.fetchone()[0]
        url = f"postgresql+psycopg2://postgres@{host}:{port}/{dbname}"
        out["postgresql"] = {"url": url, "server_version": version, "synchronous_commit": sync, "fsync": fsync,
                             "rows_only": predlog_rate(url, rows, work, False),
                             "with_image_store": predlog_rate(url, rows, work, True)}
    except Exception as e:
        out["postgresql"] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    finally:
        try:
            with admin.cursor() as c: c.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        finally:
            admin.close()
    return out


# --- main ------------------------------------------------------------------------------------------
def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.fmean(xs), 3) if xs else None


def summarise(raw: dict, concurrencies, in_flight: int | None = None) -> tuple[dict, float]:
    """Medians over the rounds per service cell, next to the in-process figures; and the best request rate. `in_flight`: the
    in-process batch per process at which the processes together hold the high concurrency's images, no more (the 8 images
    8 clients keep in flight; batch 8 in each of 2 processes holds 16): beside the heatmaps-off cells, for reading only."""
    cells, best_req_s = {}, 0.0
    for key, rs in raw["service"].items():
        style, hm, c = key.split("/")
        conc = int(c[1:])
        b1 = _median([p["img_s"] for p in raw["in_process"][f"{hm}/b1"]])
        b8 = _median([p["img_s"] for p in raw["in_process"][f"{hm}/b8"]])
        req_s = _median([r["req_s"] for r in rs])
        ref, ref_name = (b1, "batch 1") if conc == concurrencies[0] else ((b8, "batch 8") if b8 >= b1 else (b1, "batch 1"))
        cells[key] = {
            "style": style, "heatmap": hm == "heatmap_on", "concurrency": conc, "req_s": req_s,
            "p50_ms": _median([r["p50_ms"] for r in rs]), "p99_ms": _median([r["p99_ms"] for r in rs]),
            "server_time_ms_p50": _median([r["server_time_ms_p50"] for r in rs]),
            "service_cpu_ms_per_request": _median([r["service_cpu_ms_per_request"] for r in rs]),
            "mean_images_per_model_call": _median([r["mean_images_per_model_call"] for r in rs]),
            "load_generator_us_per_request": _median([r["load_generator_us_per_request"] for r in rs]),
            "errors": sum(r["errors"] for r in rs),
            "in_process_batch1_img_s": b1, "in_process_batch8_img_s": b8,
            "compared_with": ref_name, "ratio": req_s / ref if ref else None,
            "ratio_to_per_image_loop": req_s / b1 if b1 else None}
        held = raw["in_process"].get(f"{hm}/b{in_flight}") if conc == concurrencies[1] and in_flight not in (None, 1, 8) else None
        if held:
            bf = _median([p["img_s"] for p in held])
            cells[key].update({"in_process_in_flight_batch": in_flight, "in_process_in_flight_img_s": bf,
                               "ratio_to_in_flight_limit": req_s / bf if bf else None})
        best_req_s = max(best_req_s, req_s)
    return cells, best_req_s


def cores_for_service(cell: dict, req_s: float) -> float:
    "The machine's cores less what the load generator would use at `req_s` (its CPU per request as measured in `cell`)."
    return (os.cpu_count() or 1) - cell["load_generator_us_per_request"] / 1e6 * req_s


def ceiling_vs_limit(ceiling: dict, cells: dict, concurrencies, in_process_b8=()) -> dict:
    """The ceiling beside what the heatmaps-off target asks: 0.6 of the batched in-process figure, as a share of what the bare
    server reaches at the same concurrency (above 1: no service on this HTTP stack could meet it), and the service's share;
    `in_process_b8`: the in-process runs at batch 8 (their CPU per image)."""
    c = concurrencies[1]
    cell = cells.get(f"raw/heatmap_off/c{c}", {})
    bare = ceiling["req_s"].get(f"c{c}")
    limit = max(cell.get("in_process_batch1_img_s") or 0, cell.get("in_process_batch8_img_s") or 0)
    need = TARGET_RATIO["heatmap_off"] * limit if limit else None
    in_proc_cpu = _median([p["cpu_s_per_image"] * 1000 for p in in_process_b8]) if in_process_b8 else None
    service_budget = (cores_for_service(cell, need) / need * 1000) if need and cell.get("load_generator_us_per_request") else None
    return {**ceiling, f"target_heatmap_off_c{c}_req_s": need,
            f"service_cpu_ms_per_request_at_target": round(service_budget, 3) if service_budget else None,
            "in_process_cpu_ms_per_image_batch8": round(in_proc_cpu, 3) if in_proc_cpu else None,
            f"target_as_share_of_ceiling_c{c}": round(need / bare, 3) if need and bare else None,
            f"service_as_share_of_ceiling_c{c}": round(cell["req_s"] / bare, 3) if bare and cell.get("req_s") else None}


def targets_of(cells: dict, style: str, concurrencies) -> dict:
    "The issue's three figures for one way of sending the image, next to their limits."
    lo, hi = concurrencies
    out = {}
    for hm in ("heatmap_off", "heatmap_on"):
        c = cells[f"{style}/{hm}/c{hi}"]
        out[f"{hm}_concurrency{hi}_ratio"] = {
            "value": None if c["ratio"] is None else round(c["ratio"], 3), "target": TARGET_RATIO[hm],
            "meets": c["ratio"] is not None and c["ratio"] >= TARGET_RATIO[hm],
            "service_req_s": round(c["req_s"], 1), "in_process_img_s": round(max(c["in_process_batch1_img_s"], c["in_process_batch8_img_s"]), 1),
            "compared_with": f"in-process {c['compared_with']}",
            **({"in_flight_limit": {"batch_per_process": c["in_process_in_flight_batch"], "img_s": round(c["in_process_in_flight_img_s"], 1),
                                    "ratio": round(c["ratio_to_in_flight_limit"], 3)}} if c.get("ratio_to_in_flight_limit") else {})}
    c = cells[f"{style}/heatmap_off/c{lo}"]
    out[f"heatmap_off_concurrency{lo}_p99_ms"] = {"value": None if c["p99_ms"] is None else round(c["p99_ms"], 2),
                                                  "target_below": TARGET_P99_C1_MS,
                                                  "meets": c["p99_ms"] is not None and c["p99_ms"] < TARGET_P99_C1_MS}
    return out


def main(argv=None):
    from cvops.quiet import quiet_tensorflow
    quiet_tensorflow()   # TensorFlow's start-up lines (CUDA factories, cuInit) stay out of the bench's output
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/config.yaml", help="its model section is trained when nothing is deployed")
    ap.add_argument("--duration", type=float, default=8, help="seconds measured per service cell")
    ap.add_argument("--limit-duration", type=float, default=6, help="seconds measured per in-process cell")
    ap.add_argument("--warmup", type=float, default=2, help="seconds of load before each measured window")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of alternating service / in-process cells")
    ap.add_argument("--workers", type=int, default=2, help="service workers = in-process processes")
    ap.add_argument("--concurrency", default="1,8", help="two levels: the first is compared with batch 1, the second with the best in-process figure")
    ap.add_argument("--images", type=int, default=1000, help="distinct test images sent")
    ap.add_argument("--log-rows", type=int, default=10000, help="requests' rows written per prediction-log measurement")
    ap.add_argument("--postgres", default="127.0.0.1:5432", help="host:port of a PostgreSQL server (trust auth, user postgres)")
    ap.add_argument("--durability-rounds", type=int, default=None, help="rounds of durable / async cells (default: --rounds)")
    ap.add_argument("--only-durability", action="store_true", help="only the prediction log's durable vs async cost (heatmaps off)")
    ap.add_argument("--out", default="bench/results/service_throughput.json")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the clean-ups below

    from cvops.config import find_project_root, resolve_path
    project = find_project_root()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if len(concurrencies) != 2: ap.error("--concurrency takes two levels, e.g. 1,8")
    cores = os.cpu_count() or 1
    threads = max(1, cores // args.workers)                    # what the service's workers use (TF_THREADS=0)
    in_flight = max(1, concurrencies[1] // args.workers)       # images per process when the high concurrency's are all in flight
    t_begin = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="cvops-bench-service-"))
    svc = limit = None
    if args.only_durability: return bench_durability_only(args, project, concurrencies)
    try:
        model = prepare_storage(project, work, resolve_path(args.config, project))
        images, bodies = request_bodies(args.images)
        limit = InProcessLimit(model["folder"], images, args.workers, threads)
        model["parameters"] = limit.wait_ready()
        svc = bench_service(work, args.workers, model["version"])
        setup_s = time.perf_counter() - t_begin
        load_start = os.getloadavg()

        raw = {"service": {}, "in_process": {}}
        for rnd in range(args.rounds):
            for heatmap in (True, False):
                hm = "heatmap_on" if heatmap else "heatmap_off"
                for conc, batch in zip(concurrencies, (1, 8)):
                    for style in (STYLES if rnd % 2 == 0 else STYLES[::-1]):
                        r = service_cell(svc, *bodies[style], heatmap, conc, args.warmup, args.duration)
                        raw["service"].setdefault(f"{style}/{hm}/c{conc}", []).append(r)
                        print(f"round {rnd + 1} service    {style:9s} {hm:11s} concurrency {conc}: {r['req_s']:7.1f} req/s  "
                              f"p50 {_f(r['p50_ms'], '.1f')} ms  p99 {_f(r['p99_ms'], '.1f')} ms  errors {r['errors']}  "
                              f"batch {_f(r['mean_images_per_model_call'], '.1f')}  client {_f(r['load_generator_us_per_request'], '.0f')} us/req",
                              flush=True)
                    p = limit.cell(heatmap, batch, min(args.warmup, 1.0), args.limit_duration)
                    raw["in_process"].setdefault(f"{hm}/b{batch}", []).append(p)
                    print(f"round {rnd + 1} in-process {hm:11s} batch {batch}:                 {p['img_s']:7.1f} img/s", flush=True)
                if not heatmap and in_flight not in (1, 8):   # what the high concurrency allows each of the service's workers
                    p = limit.cell(False, in_flight, min(args.warmup, 1.0), args.limit_duration)
                    raw["in_process"].setdefault(f"{hm}/b{in_flight}", []).append(p)
                    print(f"round {rnd + 1} in-process {hm:11s} batch {in_flight}:                 {p['img_s']:7.1f} img/s", flush=True)
        service_s = time.perf_counter() - t_begin - setup_s
        limit.close(); limit = None
        heat_off = [c for c in raw["service"].get(f"raw/heatmap_off/c{concurrencies[1]}", []) if c["requests"]]
        answer_bytes = int(statistics.fmean(c["response_kb_mean"] for c in heat_off) * 1024) if heat_off else 400
        ceiling = bench_ceiling(args.workers, *bodies["raw"], concurrencies, args.warmup, args.duration, args.rounds, answer_bytes)
        durability = bench_durability(svc, work, args, *bodies["raw"], concurrencies, raw)
        load_end = os.getloadavg()
        svc_log_tail = svc.read_log()
        svc.stop()

        cells, best_req_s = summarise(raw, concurrencies, in_flight)
        targets = {"judged_on": "raw", "why": "the image as the request body (Content-Type image/*) is the documented path for "
                                              "programs (docs/serving.md); multipart, for browsers and curl -F, is shown beside it",
                   **{style: targets_of(cells, style, concurrencies) for style in STYLES}}
        cells_run = [c for cs in raw["service"].values() for c in cs]
        load_generator = {
            "how": "one thread per connection, pre-built HTTP/1.1 request bytes over a plain socket, answers read by Content-Length",
            "cores_mean": round(statistics.fmean(c["cpu_cores_busy"]["load_generator"] for c in cells_run), 3),
            "share_of_busy_cpu_mean": _mean([c["load_generator_share_of_busy_cpu"] for c in cells_run]),
            "us_per_request_median": _median([c["load_generator_us_per_request"] for c in cells_run]),
            "note": "the client runs on the same 2 cores as the service: its CPU is part of what the service's figures pay for"}

        others = [c["cpu_cores_busy"]["other_processes"] for part in raw.values() for cs in part.values() for c in cs]
        others = [o for o in others if o is not None]
        other_load = {"mean_cores_busy_by_other_processes": round(statistics.fmean(others), 3) if others else None,
                      "max": max(others) if others else None,
                      "load_average_1min_at_start_and_end": [round(load_start[0], 2), round(load_end[0], 2)],
                      "note": "CPU used during the cells by processes other than the service, the load generator and the "
                              "in-process workers (from /proc/stat); above ~0.2 cores the figures are disturbed"}

        t_log = time.perf_counter()
        from cvops.data.dataset import load_default_source
        classes = load_default_source().classes if model["classes"] == 10 else [f"c{i}" for i in range(model["classes"])]
        predlog = bench_predlog(images, classes, args.log_rows, work, args.postgres)
        for db in ("sqlite", "postgresql"):
            d = predlog.get(db, {})
            for v in ("rows_only", "with_image_store"):
                if v in d: d[v]["ratio_to_best_service_req_s"] = d[v]["rows_s"] / best_req_s if best_req_s else None
        predlog["target_ratio"] = TARGET_LOG_RATIO
        predlog["best_service_req_s"] = best_req_s

        import keras
        result = {
            "what": "prediction service throughput over HTTP (cvops serve) vs the same path in-process; prediction-log write rate",
            "model": {k: v for k, v in model.items() if k != "folder"},
            "service": {"workers": args.workers, "tf_threads_per_worker": threads, "host": "127.0.0.1",
                        "server": "gunicorn + cvops.serving.server.ServiceWorker (uvicorn, uvloop, httptools; a SO_REUSEPORT socket per worker)",
                        "prediction_log": "SQLite under the temp project's var/, durable (write-ahead log fsynced before each answer)",
                        "request_styles": {"raw": "POST /predict, the PNG as the body, Content-Type image/png",
                                           "multipart": "POST /predict, multipart/form-data with the PNG as the `file` field"},
                        "images": f"{len(images)} Fashion-MNIST test images, 28x28 PNG ({statistics.fmean(map(len, images)):.0f} bytes mean)"},
            "in_process": {"processes": args.workers, "tf_intra_inter_threads": threads, "start_method": "spawn",
                           "path": "check_upload -> prepare_input (prepare_batch for a batch without heatmaps, as the service's batcher) -> "
                                   "LoadedVersion(batch) -> class_probabilities (+ render_heatmap when heatmaps on)"},
            "durations_s": {"service_cell": args.duration, "in_process_cell": args.limit_duration, "warmup": args.warmup, "rounds": args.rounds},
            "targets": targets, "load_generator": load_generator, "ceiling": ceiling_vs_limit(ceiling, cells, concurrencies,
                                                                                raw["in_process"].get("heatmap_off/b8", [])),
            "cells": cells, "durability": durability, "other_load": other_load,
            "prediction_log": predlog,
            "raw": raw,
            "timing_s": {"setup": round(setup_s, 1), "service_and_in_process": round(service_s, 1),
                         "prediction_log": round(time.perf_counter() - t_log, 1), "total": round(time.perf_counter() - t_begin, 1)},
            "machine": {"cpus": cores, "platform": platform.platform(), "python": platform.python_version(), "keras": keras.__version__},
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if any(r["errors"] for rs in raw["service"].values() for r in rs): result["service_log_tail"] = svc_log_tail
        out = resolve_path(args.out, project)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        print_table(result, out)
        return result
    finally:
        if svc is not None: svc.stop()
        if limit is not None: limit.close()
        shutil.rmtree(work, ignore_errors=True)


# --- the prediction log's durability: durable (WAL + group commit before answering) vs async -------------
TARGET_DURABLE_COST = 0.15


def bench_durability(svc_durable: Service, work: Path, args, bodies, ctype, concurrencies, raw: dict) -> dict:
    """The same service with LOG_DURABILITY=async beside the durable one (its own var folder and SQLite file), idle
    while the other is measured; heatmaps off, `bodies` (the raw-body style), cells alternating durable / async for
    --durability-rounds rounds."""
    svc_async = bench_service(work, args.workers, svc_durable.version, "async", str(work / "var-async"))
    rounds = args.durability_rounds or args.rounds
    part = raw.setdefault("durability", {})
    try:
        for rnd in range(rounds):
            for conc in concurrencies:
                for mode, svc in (("durable", svc_durable), ("async", svc_async)):
                    r = service_cell(svc, bodies, ctype, False, conc, args.warmup, args.duration)
                    part.setdefault(f"{mode}/c{conc}", []).append(r)
                    print(f"round {rnd + 1} log {mode:7s} heatmap_off concurrency {conc}: {r['req_s']:7.1f} req/s  "
                          f"p50 {_f(r['p50_ms'], '.1f')} ms  p99 {_f(r['p99_ms'], '.1f')} ms  errors {r['errors']}", flush=True)
    finally:
        svc_async.stop()
    out = {"heatmaps": False, "rounds": rounds, "target_cost_concurrency8": TARGET_DURABLE_COST,
           "what": "durable: each request's rows appended to the worker's write-ahead log and fdatasync'ed (group commit) before "
                   "the answer; async: rows queued in memory. Both: SQLite prediction log, image store; the image as the body.", "cells": {}}
    for conc in concurrencies:
        for mode in ("durable", "async"):
            rs = part[f"{mode}/c{conc}"]
            out["cells"][f"{mode}/c{conc}"] = {"mode": mode, "concurrency": conc, "req_s": _median([r["req_s"] for r in rs]),
                                               "p50_ms": _median([r["p50_ms"] for r in rs]), "p99_ms": _median([r["p99_ms"] for r in rs]),
                                               "errors": sum(r["errors"] for r in rs)}
        d, a = out["cells"][f"durable/c{conc}"], out["cells"][f"async/c{conc}"]
        ratio = d["req_s"] / a["req_s"] if a["req_s"] else None
        out[f"ratio_durable_to_async_c{conc}"] = ratio
        out[f"cost_c{conc}"] = None if ratio is None else 1 - ratio
    c8 = out.get(f"cost_c{concurrencies[-1]}")
    out["meets_target"] = c8 is not None and c8 <= TARGET_DURABLE_COST
    return out


def print_durability(d: dict):
    print(f"\nprediction log durability (heatmaps off, medians of {d['rounds']} rounds; target: durable costs <= {d['target_cost_concurrency8']:.0%} at concurrency 8)")
    print(f"{'mode':8s} {'conc':>4s} {'req/s':>8s} {'p50 ms':>7s} {'p99 ms':>7s}")
    for c in d["cells"].values():
        print(f"{c['mode']:8s} {c['concurrency']:4d} {_f(c['req_s'], '8.1f')} {_f(c['p50_ms'])} {_f(c['p99_ms'])}")
    for k, v in d.items():
        if k.startswith("ratio_durable_to_async_c"):
            conc = k.rsplit("c", 1)[1]
            print(f"concurrency {conc}: durable / async = {_f(v, '.3f')} (cost {_f(d[f'cost_c{conc}'], '.1%')})")
    print("meets target" if d["meets_target"] else "BELOW target")


def bench_durability_only(args, project: Path, concurrencies) -> dict:
    "--only-durability: the durable vs async cells alone (no in-process or prediction-log measurements)."
    from cvops.config import resolve_path
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="cvops-bench-durability-"))
    svc = None
    try:
        model = prepare_storage(project, work, resolve_path(args.config, project))
        images, bodies = request_bodies(args.images)
        svc = bench_service(work, args.workers, model["version"])
        raw = {}
        d = bench_durability(svc, work, args, *bodies["raw"], concurrencies, raw)
        others = [c["cpu_cores_busy"]["other_processes"] for cs in raw["durability"].values() for c in cs]
        others = [o for o in others if o is not None]
        d["other_load_mean_cores"] = round(statistics.fmean(others), 3) if others else None
        d["raw"] = raw["durability"]
        d["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()); d["total_s"] = round(time.perf_counter() - t0, 1)
        out = resolve_path(args.out, project).with_name("service_durability.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(d, indent=2, default=str))
        print_durability(d)
        print(f"other processes kept {d['other_load_mean_cores']} cores busy on average during the cells -> {out}")
        return d
    finally:
        if svc is not None: svc.stop()
        shutil.rmtree(work, ignore_errors=True)


def _f(x, spec="7.1f"):
    return "-" if x is None else format(x, spec)


def print_table(r: dict, out: Path):
    m = r["model"]
    print(f"\nmodel {m['version']} input {'x'.join(map(str, m['input']))} {m['parameters']:,} parameters ({m['source'].split(':')[0]})")
    print(f"service: {r['service']['workers']} workers, {r['service']['tf_threads_per_worker']} TF thread(s) each; "
          f"in-process: {r['in_process']['processes']} processes; medians of {r['durations_s']['rounds']} rounds")
    print(f"{'style':9s} {'heatmaps':8s} {'conc':>4s} {'req/s':>8s} {'p50 ms':>7s} {'p99 ms':>7s} {'cpu ms':>7s} {'batch':>5s} | "
          f"{'in-proc b1':>10s} {'b8':>8s} | {'ratio':>6s} vs")
    for c in sorted(r["cells"].values(), key=lambda c: (c["style"] != "raw", not c["heatmap"], c["concurrency"])):
        print(f"{c['style']:9s} {'on' if c['heatmap'] else 'off':8s} {c['concurrency']:4d} {_f(c['req_s'], '8.1f')} {_f(c['p50_ms'])} "
              f"{_f(c['p99_ms'])} {_f(c['service_cpu_ms_per_request'], '7.2f')} {_f(c['mean_images_per_model_call'], '5.1f')} | "
              f"{_f(c['in_process_batch1_img_s'], '10.1f')} {_f(c['in_process_batch8_img_s'], '8.1f')} | {_f(c['ratio'], '6.2f')} {c['compared_with']}")
    t = r["targets"]
    print(f"\nthe targets, judged on the {t['judged_on']} path (multipart beside it):")
    for name, x in t[t["judged_on"]].items():
        y = t["multipart"][name]
        limit = f">= {x['target']}" if "target" in x else f"< {x['target_below']:g} ms"
        print(f"  {name:34s} {_f(x['value'], '7.3f')}  (target {limit}: {'meets' if x['meets'] else 'BELOW' if 'target' in x else 'OVER'})"
              f"   multipart {_f(y['value'], '7.3f')}")
        if x.get("in_flight_limit"):
            f_ = x["in_flight_limit"]
            print(f"  {'':34s} against the in-process figure with the same images in flight (batch {f_['batch_per_process']} "
                  f"per process): {f_['img_s']:.0f} img/s, ratio {f_['ratio']:.3f}")
    lg = r["load_generator"]
    print(f"load generator: {lg['cores_mean']:.2f} cores on average, {_f(lg['share_of_busy_cpu_mean'], '.1%')} of the CPU busy during "
          f"the cells, {_f(lg['us_per_request_median'], '.0f')} us per request")
    ce = r.get("ceiling")
    if ce:
        hi = max(int(k[1:]) for k in ce["req_s"])
        print(f"ceiling (bench/bare_server.py: the same server, no model, no logging): "
              + ", ".join(f"concurrency {k[1:]} {v:.0f} req/s" for k, v in ce["req_s"].items())
              + f"\n  0.6 of the in-process figure = {_f(ce.get(f'target_heatmap_off_c{hi}_req_s'), '.0f')} req/s = "
              f"{_f(ce.get(f'target_as_share_of_ceiling_c{hi}'), '.2f')} of the ceiling; the service reaches "
              f"{_f(ce.get(f'service_as_share_of_ceiling_c{hi}'), '.2f')} of it"
              f"\n  at that rate the service would have {_f(ce.get('service_cpu_ms_per_request_at_target'), '.3f')} ms of CPU per request "
              f"(the cores less the load generator's share); the in-process path alone takes "
              f"{_f(ce.get('in_process_cpu_ms_per_image_batch8'), '.3f')} ms per image at batch 8, the bare server "
              + ", ".join(f"{_f(v, '.3f')} ms at concurrency {k[1:]}" for k, v in ce.get("server_cpu_ms_per_request", {}).items()))
    print_durability(r["durability"])
    pl = r["prediction_log"]
    print(f"\nprediction log ({pl['rows_queued']} requests' rows; ratio to the best service rate {pl['best_service_req_s']:.1f} req/s, target {pl['target_ratio']:.0f}x)")
    for db in ("sqlite", "postgresql"):
        d = pl.get(db, {})
        if "rows_only" not in d:
            print(f"  {db:10s} {d.get('status', '?')}: {d.get('reason', '')}"); continue
        for v in ("rows_only", "with_image_store"):
            x = d[v]
            print(f"  {db:10s} {v:16s} {x['rows_s']:9.0f} rows/s  {_f(x['ratio_to_best_service_req_s'])}x")
    ol = r["other_load"]
    if ol["mean_cores_busy_by_other_processes"] is not None:
        print(f"other processes kept {ol['mean_cores_busy_by_other_processes']:.2f} cores busy on average during the cells (max {ol['max']:.2f})"
              + ("  -- the machine was not quiet: figures are noisy" if ol["mean_cores_busy_by_other_processes"] > 0.2 else ""))
    print(f"-> {out}  ({r['timing_s']['total']:.0f} s)")


if __name__ == "__main__":
    main()
