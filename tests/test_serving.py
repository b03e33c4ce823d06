"""The prediction service over real HTTP: `cvops serve` (gunicorn, 2 uvicorn workers) on a free
port, with a small Fashion-MNIST model published into a throw-away central storage. The tests
after the round trip run twice (fixture `db`): on the default SQLite database and on a fresh
database of the machine's PostgreSQL server (127.0.0.1:5432, user postgres, trust auth; skipped
when unreachable, failed when CI=true)."""
import io
import os
import signal
import struct
import subprocess
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import requests
import sqlalchemy as sa

from cvops.testing import ADMIN_TOKEN, BIN, PredictionLoad, encode, need

pytestmark = pytest.mark.service

PG = dict(host="127.0.0.1", port=5432, user="postgres")
MAX_UPLOAD_BYTES, MAX_IMAGE_PIXELS = 200_000, 50_000_000


# --- the database each test logs to ---------------------------------------------------------------
@dataclass
class DB:
    kind: str
    service_url: Optional[str]   # DB_URL for the service (None: its default SQLite file)
    url: str                     # where the test reads the rows back


def _postgres_admin():
    import psycopg2
    try:
        conn = psycopg2.connect(dbname="postgres", connect_timeout=3, **PG)
    except psycopg2.OperationalError as e:
        need(f"PostgreSQL at {PG['host']}:{PG['port']} (user {PG['user']})", f"unreachable: {str(e).strip()}")
    conn.autocommit = True
    return conn


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, service_root):
    "The service's database: its default SQLite file, or a fresh uniquely named PostgreSQL database (dropped afterwards)."
    if request.param == "sqlite":
        from cvops.settings import default_db_url
        yield DB("sqlite", None, default_db_url(service_root["root"]))
        return
    conn = _postgres_admin()
    name = f"cvops_test_{uuid.uuid4().hex[:12]}"
    with conn.cursor() as cur: cur.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
    try:
        yield DB("postgresql", url, url)
    finally:
        with conn.cursor() as cur: cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def _rows(db_url, table, where=None):
    from cvops.predlog import schema as predlog
    t = getattr(predlog, table)
    eng = sa.create_engine(db_url)
    try:
        with eng.connect() as c:
            q = sa.select(t) if where is None else sa.select(t).where(where(t))
            return [dict(r._mapping) for r in c.execute(q)]
    finally:
        eng.dispose()


def _count(db_url, table) -> int:
    from cvops.predlog import schema as predlog
    eng = sa.create_engine(db_url)
    try:
        with eng.connect() as c: return c.execute(sa.select(sa.func.count()).select_from(getattr(predlog, table))).scalar()
    finally:
        eng.dispose()


# --- images -------------------------------------------------------------------------------------
def _png_zeros(w: int, h: int) -> bytes:
    "A valid greyscale (1-bit) PNG of w x h black pixels, built row by row: tiny to send, huge to decode."
    def chunk(kind, data): return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\0" * (1 + (w + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * 100) for _ in range(h // 100)) + z.compress(row * (h % 100)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _exif_rotated_jpeg(img: np.ndarray, orientation: int) -> tuple[bytes, np.ndarray]:
    """`img` stored rotated with EXIF Orientation set so that a viewer shows it upright (as a camera
    writes it); returns the JPEG and the upright pixels a viewer shows (the decoded JPEG, turned back)."""
    from PIL import Image, ImageOps
    turns = {3: 2, 6: 1, 8: -1}[orientation]          # 6: stored turned 90 degrees counter-clockwise
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(img, turns)))
    exif = Image.Image.getexif(Image.new("L", (1, 1))); exif[0x0112] = orientation
    b = io.BytesIO(); stored.save(b, "JPEG", quality=100, exif=exif.tobytes())
    decoded = np.asarray(Image.open(io.BytesIO(b.getvalue())))
    viewer = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(b.getvalue()))))
    np.testing.assert_array_equal(viewer, np.rot90(decoded, -turns))
    return b.getvalue(), viewer


# --- HTTP helpers -------------------------------------------------------------------------------
def _worker_pids(svc, n: int = 2, timeout: float = 30) -> dict:
    "pid -> version of the workers answering /models/current, until `n` distinct ones were seen."
    seen, deadline = {}, time.time() + timeout
    while time.time() < deadline:
        d = requests.get(svc.url("/models/current"), timeout=5).json()
        seen[d["worker_pid"]] = d["version"]
        if len(seen) >= n: return seen
    raise AssertionError(f"only saw workers {seen} within {timeout} s")


def _good_png(trained_models, i=0) -> bytes:
    return encode(trained_models["a"].images[i], "PNG")


def test_round_trip_classes_right_and_same_preprocessing_as_training(service_root, service_factory, trained_models):
    "Real test images over HTTP: mostly right, and the probabilities equal the model on cvops.data.preprocess.preprocess."
    import keras
    from cvops.data.preprocess import preprocess, to_model_input
    svc = service_factory(service_root["root"])
    svc.wait_workers_ready(service_root["a"])
    folder, xt, yt, acc = trained_models["a"]
    model = keras.models.load_model(folder / "model.keras", compile=False)
    classes = requests.get(svc.url("/models/current"), timeout=5).json()["classes"]
    right = 0
    for i in range(20):
        data = encode(xt[i], "PNG")
        r = svc.predict(data)
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["model_name"] == "fashion_small" and d["model_version"] == service_root["a"]
        assert abs(sum(d["probabilities"].values()) - 1) < 1e-3 and d["heatmap"] and d["overlay"]
        right += d["top_class"] == classes[yt[i]]
        expected = np.asarray(model(to_model_input(preprocess(data, (28, 28), 1)[None])))[0]
        got = np.array([d["probabilities"][c] for c in classes])
        np.testing.assert_allclose(got, expected, atol=1e-4)
    assert right >= 14, f"{right}/20 right (model accuracy {acc:.2f})"
    svc.stop()
    assert _count(f"sqlite:///{service_root['root'] / 'var' / 'cvops.db'}", "predictions") == 20
    assert _count(f"sqlite:///{service_root['root'] / 'var' / 'cvops.db'}", "api_log") >= 20


# --- the raw body, micro-batching ---------------------------------------------------------------------
def _metric(text: str, name: str) -> float:
    "The sum of a metric's samples in a /metrics answer."
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def _raw(svc, data: bytes, content_type: str, heatmap: bool = True, timeout: float = 30):
    return requests.post(svc.url("/predict") + ("" if heatmap else "?heatmap=false"), data=data,
                         headers={"Content-Type": content_type}, timeout=timeout)


def _send_together(svc, uploads: list, heatmap: bool) -> list:
    "Send every `(data, content type)` at once, one thread and one connection each (released together); the answers, in order."
    import threading
    barrier, answers = threading.Barrier(len(uploads)), [None] * len(uploads)
    def one(i):
        with requests.Session() as s:
            s.get(svc.url("/health"), timeout=10)          # connected before the barrier
            barrier.wait(30)
            data, ctype = uploads[i]
            answers[i] = s.post(svc.url("/predict") + ("" if heatmap else "?heatmap=false"), data=data,
                                headers={"Content-Type": ctype}, timeout=60)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(uploads))]
    for t in threads: t.start()
    for t in threads: t.join(120)
    return answers


def test_raw_body_answers_as_multipart_requests_sent_together_are_batched_and_spread(service_root, service_factory, trained_models):
    """The image as the request body (Content-Type image/*) gets the answer the multipart form gets, and is logged the same; any
    other body type is a 415 naming both ways. Requests sent together are batched by the workers, and each gets its own
    image's prediction. Connections opened in a burst end spread over the workers."""
    import keras
    from PIL import Image
    from cvops.data.preprocess import preprocess, to_model_input
    svc = service_factory(service_root["root"])
    svc.wait_workers_ready(service_root["a"])
    folder, xt, yt, acc = trained_models["a"]
    classes = requests.get(svc.url("/models/current"), timeout=5).json()["classes"]
    db_url = f"sqlite:///{service_root['root'] / 'var' / 'cvops.db'}"

    # the raw body: the multipart answer (probabilities, heatmap), the same logged row and stored image
    pairs = []
    for i, (data, ctype) in enumerate([(encode(xt[0], "PNG"), "image/png"), (encode(xt[1], "JPEG", quality=95), "image/jpeg"),
                                       (encode(xt[2], "PNG"), "application/octet-stream"), (encode(xt[3], "WEBP", lossless=True), "image/webp")]):
        heatmap = i % 2 == 0
        raw, form = _raw(svc, data, ctype, heatmap), svc.predict(data, "x.img", ctype, heatmap=heatmap)
        assert raw.status_code == form.status_code == 200, (ctype, raw.text[:300], form.text[:300])
        r, f = raw.json(), form.json()
        assert raw.headers["content-type"] == "application/json" and raw.headers["X-Request-ID"] == r["request_id"], raw.headers
        assert raw.headers["X-Model-Version"] == r["model_version"] == f["model_version"] == service_root["a"]
        assert r["top_class"] == f["top_class"], (ctype, r, f)
        np.testing.assert_allclose([r["probabilities"][c] for c in classes], [f["probabilities"][c] for c in classes], atol=1e-5)
        assert set(r) == set(f) == {"request_id", "model_name", "model_version", "top_class", "probabilities", "time_ms", "heatmap", "overlay"}
        if heatmap:
            import base64
            heat = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d[k]))), np.int16) for d in (r, f) for k in ("heatmap", "overlay")]
            assert heat[0].shape == heat[2].shape and heat[1].shape == heat[3].shape
            assert np.abs(heat[0] - heat[2]).max() <= 2 and np.abs(heat[1] - heat[3]).max() <= 2
        else:
            assert r["heatmap"] is None and r["overlay"] is None
        pairs.append((r["request_id"], f["request_id"]))

    # /predict straight to the route (`ServiceApp`: no query string or a valid `heatmap`) and through FastAPI (any other
    # query string): the same answer and logged row; a `heatmap` that is not a bool gets FastAPI's 422 naming it
    data = encode(xt[4], "PNG")
    direct = requests.post(svc.url("/predict?heatmap=false"), data=data, headers={"Content-Type": "image/png"}, timeout=30)
    routed = requests.post(svc.url("/predict?heatmap=false&via=fastapi"), data=data, headers={"Content-Type": "image/png"}, timeout=30)
    assert direct.status_code == routed.status_code == 200, (direct.text[:300], routed.text[:300])
    d, f = direct.json(), routed.json()
    assert set(d) == set(f) and d["top_class"] == f["top_class"] and d["probabilities"] == f["probabilities"], (d, f)
    assert direct.headers["X-Model-Version"] == routed.headers["X-Model-Version"] == service_root["a"]
    pairs.append((d["request_id"], f["request_id"]))
    bad = requests.post(svc.url("/predict?heatmap=maybe"), data=data, headers={"Content-Type": "image/png"}, timeout=30)
    assert bad.status_code == 422 and "heatmap" in bad.json()["error"], bad.text

    # any other body type: 415 naming the two ways; garbage said to be an image: 415 from the image check
    for data, ctype in ((b"hello", "text/plain"), (b'{"file": "x"}', "application/json"), (b"file=x", "application/x-www-form-urlencoded")):
        r = _raw(svc, data, ctype)
        assert r.status_code == 415, (ctype, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert f"unsupported content type '{ctype}'" in err and "image/png" in err and "multipart/form-data" in err, err
    r = _raw(svc, os.urandom(3000), "image/png")
    assert r.status_code == 415 and "not an image" in r.json()["error"], r.text
    r = requests.post(svc.url("/predict"), timeout=10)
    assert r.status_code == 422 and "file" in r.json()["error"] and "required" in r.json()["error"].lower(), r.text

    # requests sent together: batched by the workers, and each answered with its own image's prediction
    model = keras.models.load_model(folder / "model.keras", compile=False)
    picks = [int(np.flatnonzero(yt == c)[k]) for k in range(2) for c in range(len(classes)) if (yt == c).sum() > k][:16]
    before = requests.get(svc.url("/metrics"), timeout=5).text
    for heatmap in (False, True, False):
        uploads = [(encode(xt[i], "PNG"), "image/png") if j % 2 else (encode(xt[i], "JPEG", quality=95), "image/jpeg")
                   for j, i in enumerate(picks)]
        answers = _send_together(svc, uploads, heatmap)
        for (data, _), i, a in zip(uploads, picks, answers):
            assert a is not None and a.status_code == 200, a.text[:300] if a is not None else "no answer"
            expected = np.asarray(model(to_model_input(preprocess(data, (28, 28), 1)[None])))[0]
            got = np.array([a.json()["probabilities"][c] for c in classes])
            np.testing.assert_allclose(got, expected, atol=1e-4)
            assert a.json()["top_class"] == classes[int(expected.argmax())]
            assert (a.json()["overlay"] is not None) == heatmap
    after = requests.get(svc.url("/metrics"), timeout=5).text
    calls = _metric(after, "cvops_inference_batch_images_count") - _metric(before, "cvops_inference_batch_images_count")
    images = _metric(after, "cvops_inference_batch_images_sum") - _metric(before, "cvops_inference_batch_images_sum")
    assert images == 3 * len(picks) and calls < images, (calls, images)   # some model calls took more than one image

    # 8 connections opened at once, used back to back: they end spread over both workers (a worker holding more than its
    # share of the requests plus one answers `Connection: close`, and the client reconnects), whichever worker took the burst
    import psutil, threading
    def client_ports() -> set:
        return {c.laddr.port for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == svc.port}
    import gc
    gc.collect()                      # connections of the requests above that only wait for the collector: closed now, so that
    earlier = client_ports()          # none closes during the burst and hands its port to one of ours (that one would not count)
    png = encode(xt[0], "PNG")
    barrier, sessions, statuses = threading.Barrier(8), [requests.Session() for _ in range(8)], []
    def hammer(sess):
        barrier.wait(30)
        statuses.extend(sess.post(svc.url("/predict?heatmap=false"), data=png, headers={"Content-Type": "image/png"}, timeout=60).status_code
                        for _ in range(60))
    threads = [threading.Thread(target=hammer, args=(sess,)) for sess in sessions]
    for t in threads: t.start()
    for t in threads: t.join(300)
    assert statuses == [200] * 480, sorted(set(statuses))
    for sess in sessions: sess.get(svc.url("/health"), timeout=10)   # a session whose last answer said `Connection: close`
    ours = client_ports() - earlier                                   # reconnects (a kept connection is reused as it is)
    held = {pid: sum(c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port in ours for c in psutil.Process(pid).net_connections("tcp"))
            for pid in svc.worker_pids()}
    for sess in sessions: sess.close()
    assert len(ours) == 8 and sum(held.values()) == 8 and max(held.values()) <= 6, (len(ours), held)

    # every answer logged: the raw body's row and image as the form's
    svc.stop()
    rows = {r["request_id"]: r for r in _rows(db_url, "predictions")}
    for raw_id, form_id in pairs:
        assert rows[raw_id]["image_sha256"] == rows[form_id]["image_sha256"] and rows[raw_id]["top_class"] == rows[form_id]["top_class"]
    assert len(rows) == 10 + 3 * len(picks) + 480


# --- 1 + 2 + 7: uploads and PUT requests ---------------------------------------------------------
def _send_bad_requests(svc, service_root, trained_models) -> tuple[dict, int]:
    """1 and 7: each bad request is answered with a 4xx JSON error naming the problem, and the workers still serve;
    returns ({request_id: (case, status, error)}, number of 200 predictions)."""
    xt = trained_models["a"].images
    jpeg = encode(np.stack([xt[0]] * 3, -1), "JPEG", quality=90)             # cut in half: inside the header
    big_jpeg = encode(np.kron(xt[0], np.ones((8, 8), np.uint8)), "JPEG", quality=95)  # 224 x 224: cut inside the scan data
    from PIL import Image
    Image.open(io.BytesIO(big_jpeg[:len(big_jpeg) // 2]))   # the header is whole
    rng = np.random.default_rng(0)
    big = encode(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8), "PNG")
    assert len(big) > MAX_UPLOAD_BYTES
    bomb, many_pixels = _png_zeros(20000, 20000), _png_zeros(10000, 8000)   # over PIL's own limit; over MAX_IMAGE_PIXELS only
    assert len(bomb) < MAX_UPLOAD_BYTES and len(many_pixels) < MAX_UPLOAD_BYTES
    post = lambda **kw: requests.post(svc.url("/predict"), timeout=30, **kw)
    cases = {  # name: (request, expected status, words the error must contain)
        "text/plain": (lambda: svc.predict(b"hello, world", "x.txt", "text/plain"), 415, ["content type", "text/plain"]),
        "not an image": (lambda: svc.predict(os.urandom(5000), "x.png", "image/png"), 415, ["not an image"]),
        "truncated jpeg (header)": (lambda: svc.predict(jpeg[:len(jpeg) // 2], "x.jpg", "image/jpeg"), 400, ["truncated"]),
        "truncated jpeg (scan data)": (lambda: svc.predict(big_jpeg[:len(big_jpeg) // 2], "x.jpg", "image/jpeg"), 400, ["truncated"]),
        "zero bytes": (lambda: svc.predict(b"", "x.png", "image/png"), 400, ["empty"]),
        "too many bytes": (lambda: svc.predict(big, "x.png", "image/png"), 413, [f"{MAX_UPLOAD_BYTES:,}", "bytes"]),
        "decompression bomb": (lambda: svc.predict(bomb, "x.png", "image/png"), 413, ["pixels"]),
        "over MAX_IMAGE_PIXELS": (lambda: svc.predict(many_pixels, "x.png", "image/png"), 413, ["pixels", f"{MAX_IMAGE_PIXELS:,}"]),
        "no file field": (lambda: post(files={"image": ("x.png", _good_png(trained_models), "image/png")}), 422, ["file", "required"]),
        "no body": (lambda: post(), 422, ["file", "required"]),
        "NUL in the path": (lambda: requests.get(svc.url("/predict%00"), timeout=10), 404, ["not found"]),
        # 7: deploying over HTTP needs the admin token, and takes published names only
        "PUT without token": (lambda: requests.put(svc.url("/models/current"), json={"model_name": "fashion_small"}, timeout=30),
                              401, ["authorization"]),
        "PUT wrong token": (lambda: svc.deploy("fashion_small", service_root["b"], token="wrong"), 403, ["wrong admin token"]),
        "PUT ../x": (lambda: svc.deploy("../x"), 422, ["model_name"]),
        "PUT ../../etc version": (lambda: svc.deploy("fashion_small", "../../etc/passwd@1"), 422, ["version"]),
        "PUT ..": (lambda: svc.deploy(".."), 404, ["no published model", "'..'"]),
        "PUT unknown model": (lambda: svc.deploy("no_such_model"), 404, ["no published model", "no_such_model"]),
        "PUT unknown version": (lambda: svc.deploy("fashion_small", "fashion_small@20000101T000000Z"), 404, ["no published version"]),
    }
    answers, good = {}, 0
    for name, (send, status, words) in cases.items():
        r = send()
        assert r.status_code == status, f"{name}: {r.status_code} {r.text[:500]}"
        body = r.json()
        assert set(body) == {"error", "request_id"}, f"{name}: {body}"
        assert all(w.lower() in body["error"].lower() for w in words), f"{name}: {body['error']!r} should name {words}"
        assert r.headers["X-Request-ID"] == body["request_id"]
        answers[body["request_id"]] = (name, status, body["error"])
        for i in range(2):   # the workers still serve
            ok = svc.predict(_good_png(trained_models, i), heatmap=False)
            assert ok.status_code == 200, f"after {name}: {ok.status_code} {ok.text[:300]}"
            good += 1
    return answers, good


def _send_conversions(svc, trained_models) -> int:
    """2: greyscale, RGB, RGBA, grey+alpha, palette and 16-bit PNGs, WebP, BMP, TIFF, GIF and EXIF-rotated JPEGs
    of a test image give the prediction of its upright 8-bit greyscale PNG; returns the number of 200 predictions."""
    from PIL import Image
    classes = requests.get(svc.url("/models/current"), timeout=5).json()["classes"]
    xt = trained_models["a"].images
    grey_palette = [v for i in range(256) for v in (i, i, i)]

    def probs(data, content_type="image/png", filename="x.png"):
        r = svc.predict(data, filename, content_type, heatmap=False)
        assert r.status_code == 200, r.text[:500]
        return np.array([r.json()["probabilities"][c] for c in classes])

    n = 0
    for i in range(4):
        x = xt[i]
        original = probs(encode(x, "PNG"))
        rgb = np.stack([x] * 3, -1)
        pal = Image.fromarray(x, "P"); pal.putpalette(grey_palette)
        b = io.BytesIO(); pal.save(b, "PNG")
        variants = {
            "RGB PNG": encode(rgb, "PNG"),
            "RGBA PNG": encode(np.dstack([rgb, np.full_like(x, 255)]), "PNG"),
            "grey+alpha PNG": encode(np.dstack([x, np.full_like(x, 255)]), "PNG"),
            "palette PNG": b.getvalue(),
            "16-bit PNG": encode(x.astype(np.uint16) * 257, "PNG"),
            "lossless WebP": encode(rgb, "WEBP", lossless=True),
            "BMP": encode(x, "BMP"),
            "TIFF": encode(x, "TIFF"),
            "GIF": encode(x, "GIF"),
        }
        assert Image.open(io.BytesIO(variants["16-bit PNG"])).mode.startswith("I;16")
        assert Image.open(io.BytesIO(variants["palette PNG"])).mode == "P"
        for name, data in variants.items():
            np.testing.assert_allclose(probs(data), original, atol=1e-4, err_msg=name)
            n += 1
        for orientation in (3, 6, 8):
            jpeg, upright = _exif_rotated_jpeg(x, orientation)
            got = probs(jpeg, "image/jpeg", "x.jpg")
            # exactly what the upright pixels of that JPEG give, and the original's class and about its probabilities
            np.testing.assert_allclose(got, probs(encode(upright, "PNG")), atol=1e-4, err_msg=f"EXIF {orientation}")
            assert got.argmax() == original.argmax(), f"EXIF {orientation}: {got} vs {original}"
            np.testing.assert_allclose(got, original, atol=0.1, err_msg=f"EXIF {orientation}")
            n += 2
        n += 1
    return n


def test_uploads_bad_ones_get_a_4xx_json_error_and_are_logged_and_conversions_are_right(service_root, service_factory, trained_models, db):
    svc = service_factory(service_root["root"], db_url=db.service_url,
                          env={"MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES), "MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS)})
    svc.wait_workers_ready(service_root["a"])
    pids = _worker_pids(svc)
    answers, good = _send_bad_requests(svc, service_root, trained_models)
    good += _send_conversions(svc, trained_models)
    # no worker died or was restarted, and nothing was deployed
    assert _worker_pids(svc) == pids
    assert requests.get(svc.url("/models/current"), timeout=5).json()["deployment"]["version"] == service_root["a"]
    svc.stop()
    logged = {r["request_id"]: r for r in _rows(db.url, "api_log", lambda t: t.c.request_id.in_(list(answers)))}
    for rid, (name, status, error) in answers.items():
        assert rid in logged, f"{name}: no api_log row"
        assert (logged[rid]["status_code"], logged[rid]["error"]) == (status, error), f"{name}: {logged[rid]}"
    assert _count(db.url, "predictions") == good
    assert not _rows(db.url, "api_log", lambda t: t.c.status_code >= 500)


# --- 3: schemathesis ----------------------------------------------------------------------------
def test_schemathesis_finds_no_server_errors(service_root, service_factory, db, tmp_path):
    "Property-based requests from /openapi.json (the admin token included, so PUT /models/current runs its body checks): no 5xx."
    import xml.etree.ElementTree as ET
    svc = service_factory(service_root["root"], db_url=db.service_url)
    svc.wait_workers_ready(service_root["a"])
    junit = tmp_path / "schemathesis.xml"
    cmd = [str(BIN / "schemathesis"), "run", svc.url("/openapi.json"), "--checks", "not_a_server_error",
           "--max-examples", "30", "--seed", "20240601", "--phases", "examples,coverage,fuzzing", "--request-timeout", "30",
           "-H", f"Authorization: Bearer {ADMIN_TOKEN}", "--report", "junit", "--report-junit-path", str(junit)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
                       env={**os.environ, "NO_COLOR": "1"})
    out = p.stdout[-6000:] + p.stderr[-3000:]
    assert p.returncode == 0, f"schemathesis exited {p.returncode}:\n{out}\n--- service log\n{svc.read_log()}"
    suite = ET.parse(junit).getroot()
    cases = suite.findall(".//testcase")
    failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
    assert cases and not failed, f"{failed}\n{out}"
    tested = {c.get("name") for c in cases}
    assert {"POST /predict", "PUT /models/current"} <= tested, tested
    # it may redeploy a version it saw in a response, never the corrupt one
    assert requests.get(svc.url("/models/current"), timeout=5).json()["deployment"]["version"] in (service_root["a"], service_root["b"])
    svc.stop()
    rows = _rows(db.url, "api_log")
    assert not [r for r in rows if r["status_code"] >= 500], [r for r in rows if r["status_code"] >= 500][:5]
    puts = [r for r in rows if r["method"] == "PUT"]
    assert any(r["status_code"] not in (401, 403) for r in puts), "the admin header did not reach PUT /models/current"
    assert sum(r["route"] == "/predict" for r in rows) >= 20


# --- 4 + 5 + 8: deploy under load, a corrupt version refused, rollback ----------------------------
def test_deploy_under_load_refuses_a_corrupt_version_and_rolls_back(service_root, service_factory, trained_models, db):
    svc = service_factory(service_root["root"], db_url=db.service_url)
    a, b = service_root["a"], service_root["b"]
    svc.wait_workers_ready(a)
    images = [encode(x, "PNG") for x in trained_models["a"].images[:32]]
    ok = 0   # 200 answers of /predict in this test

    # 4: deploy b while 4 threads predict
    with PredictionLoad(svc, images, n=4, heatmap="alternate") as load:
        time.sleep(3)
        r = requests.put(svc.url("/models/current"), json={"model_name": "fashion_small", "version": b, "reason": "load test"},
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Deployed-By": "load-test"}, timeout=60)
        put_done = time.monotonic()
        time.sleep(4)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["version"] == b and d["previous_version"] == a and d["deployed_by"].startswith("load-test")
    assert len(d["workers"]) == 2 and set(d["workers"].values()) == {b}, d["workers"]
    assert not load.failed(), load.failed()[:5]
    after = [res for res in load.results if res.started > put_done]
    assert len(after) >= 10 and {res.model_version for res in after} == {b}, [res for res in after if res.model_version != b][:5]
    assert {res.model_version for res in load.results if res.ended < put_done} >= {a}
    ok += len(load.results)
    history = requests.get(svc.url("/models/history"), timeout=5).json()
    assert history[0]["version"] == b and history[0]["deployed_by"].startswith("load-test") and history[0]["reason"] == "load test"
    assert history[1]["version"] == a and history[1]["deployed_by"] == "tests"
    metrics = requests.get(svc.url("/metrics"), timeout=5).text
    assert f'cvops_model_serving{{version="{b}"}} 1.0' in metrics, [l for l in metrics.splitlines() if "serving" in l]
    assert f'cvops_model_serving{{version="{a}"}} 0.0' in metrics

    # 5: a version that cannot load is refused; b keeps serving, the pointer stays
    with PredictionLoad(svc, images, n=2, heatmap="alternate") as load:
        r = svc.deploy("fashion_small", service_root["corrupt"])
        time.sleep(1.5)
    assert r.status_code == 422, r.text
    assert service_root["corrupt"] in r.json()["error"] and "cannot be loaded" in r.json()["error"], r.json()
    assert not load.failed() and {res.model_version for res in load.results} == {b}, load.failed()[:5]
    ok += len(load.results)
    for pid, version in _worker_pids(svc).items(): assert version == b, (pid, version)
    cur = requests.get(svc.url("/models/current"), timeout=5).json()
    assert cur["version"] == b and cur["deployment"]["version"] == b and cur["load_error"] is None
    assert requests.get(svc.url("/models/history"), timeout=5).json()[0]["version"] == b

    # rollback: deploy a again
    r = svc.deploy("fashion_small", a)
    assert r.status_code == 200 and set(r.json()["workers"].values()) == {a}, r.text
    for i in range(6):
        p = svc.predict(images[i], heatmap=False)
        assert p.status_code == 200 and p.json()["model_version"] == a, p.text[:300]
        ok += 1

    # 8: one predictions row per 200 answer, written by the time the service stopped
    svc.stop()
    assert _count(db.url, "predictions") == ok
    versions = {r["model_version"] for r in _rows(db.url, "predictions")}
    assert versions == {a, b}
    assert not _rows(db.url, "api_log", lambda t: t.c.status_code >= 500)


# --- 6: start-up without a model, deploy by CLI, a killed worker ------------------------------------
def test_start_without_a_model_deploy_by_cli_and_a_killed_worker_comes_back(service_root, service_factory, trained_models, db):
    root, a = service_root["root"], service_root["a"]
    (service_root["storage"] / "deployments" / "current.json").unlink()
    svc = service_factory(root, db_url=db.service_url)
    image = encode(trained_models["a"].images[0], "PNG")
    for _ in range(6):   # both workers: no model
        r = svc.predict(image)
        assert r.status_code == 503 and "cvops deploy" in r.json()["error"] and "PUT /models/current" in r.json()["error"], r.text
        ready = requests.get(svc.url("/ready"), timeout=5)
        assert ready.status_code == 503 and not ready.json()["ready"], ready.text
        assert any("no model is deployed" in reason for reason in ready.json()["reasons"]), ready.json()
    env = {k: v for k, v in os.environ.items() if k not in ("CVOPS_CENTRAL_STORAGE", "MLFLOW_TRACKING_URI", "DB_URL")}
    p = subprocess.run([str(BIN / "cvops"), "deploy", "fashion_small", "--version", a, "--by", "cli-test"], cwd=root,
                       env={**env, "CVOPS_ROOT": str(root), "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    t0 = time.monotonic()
    svc.wait_workers_ready(a, timeout=10)
    assert time.monotonic() - t0 < 10
    assert requests.get(svc.url("/ready"), timeout=5).status_code == 200
    pids = _worker_pids(svc)
    assert set(pids.values()) == {a}

    # SIGKILL one worker while predictions go on: gunicorn starts another, which serves the pointer's version
    victim = min(pids)
    with PredictionLoad(svc, [image], n=2, heatmap="alternate") as load:
        time.sleep(1)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        deadline, new = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            d = requests.get(svc.url("/models/current"), timeout=5).json()
            if d["worker_pid"] not in pids:
                new[d["worker_pid"]] = d["version"]
                if d["version"] == a: break
            time.sleep(0.1)
        time.sleep(1)
    assert new and a in new.values(), f"no new worker serving {a} within 60 s: {new}\n{svc.read_log()}"
    assert victim not in _worker_pids(svc)
    failed = load.failed()
    # at most the requests in flight on the killed worker fail (one per thread), and only by a broken connection
    assert len(failed) <= 2 and all(f.status is None and f.started < killed_at for f in failed), failed
    assert sum(res.status == 200 for res in load.results) >= 10
    r = svc.predict(image)
    assert r.status_code == 200 and r.json()["model_version"] == a
