"""`bench/service_throughput.py`'s ceiling: the bare server really runs under the service's worker class, answers the load
generator, and is gone afterwards; and what the heatmaps-off target asks of it is computed from the run's own figures."""
import importlib.util
import os

import psutil

from conftest import REPO

spec = importlib.util.spec_from_file_location("service_throughput", REPO / "bench" / "service_throughput.py")
st = importlib.util.module_from_spec(spec); spec.loader.exec_module(st)


def _gunicorns() -> set:
    return {p.pid for p in psutil.process_iter(["cmdline"]) if "bare_server:app" in " ".join(p.info["cmdline"] or [])}


def test_the_bare_server_answers_the_load_generator_and_is_stopped():
    before = _gunicorns()
    body = b"\x89PNG\r\n\x1a\n" + os.urandom(300)
    out = st.bench_ceiling(2, [body], "image/png", [1, 4], warm=0.2, dur=0.8, rounds=1, response_bytes=420)
    assert set(out["req_s"]) == {"c1", "c4"} and all(v > 50 for v in out["req_s"].values()), out
    assert all(v is not None and v > 0 for v in out["server_cpu_ms_per_request"].values()), out
    assert _gunicorns() == before                                  # stopped with its workers


def test_the_target_is_set_against_the_ceiling_and_the_cpu_left():
    cell = {"req_s": 1000.0, "in_process_batch1_img_s": 3000.0, "in_process_batch8_img_s": 8000.0,
            "load_generator_us_per_request": 100.0}
    ceiling = {"req_s": {"c1": 6000.0, "c8": 19200.0}, "server_cpu_ms_per_request": {"c8": 0.05}}
    got = st.ceiling_vs_limit(ceiling, {"raw/heatmap_off/c8": cell}, [1, 8], [{"cpu_s_per_image": 0.0003}, {"cpu_s_per_image": 0.0004}])
    assert got["target_heatmap_off_c8_req_s"] == 0.6 * 8000                      # 0.6 of the better in-process figure
    assert got["target_as_share_of_ceiling_c8"] == 0.25 and got["service_as_share_of_ceiling_c8"] == round(1000 / 19200, 3)
    cores = os.cpu_count() or 1
    assert abs(got["service_cpu_ms_per_request_at_target"] - round((cores - 100e-6 * 4800) / 4800 * 1000, 3)) < 1e-9
    assert got["in_process_cpu_ms_per_image_batch8"] == 0.35


def test_the_in_flight_limit_sits_beside_the_batched_one_and_does_not_judge():
    "Concurrency 8 over 2 workers: the in-process figure at batch 4 (8 images in flight) is reported beside batch 8 (16)."
    cell = {"req_s": 1200.0, "p50_ms": 6.0, "p99_ms": 9.0, "server_time_ms_p50": 2.0, "service_cpu_ms_per_request": 1.2,
            "mean_images_per_model_call": 3.8, "load_generator_us_per_request": 30.0, "errors": 0}
    raw = {"service": {f"raw/{hm}/c{c}": [dict(cell)] for hm in ("heatmap_off", "heatmap_on") for c in (1, 8)},
           "in_process": {f"{hm}/b{b}": [{"img_s": v}] for hm in ("heatmap_off", "heatmap_on") for b, v in ((1, 1500.0), (8, 4000.0))}}
    raw["in_process"]["heatmap_off/b4"] = [{"img_s": 3000.0}]
    cells, _ = st.summarise(raw, [1, 8], in_flight=4)
    off8 = cells["raw/heatmap_off/c8"]
    assert off8["ratio"] == 1200 / 4000 and off8["ratio_to_in_flight_limit"] == 1200 / 3000   # judged against batch 8
    assert "ratio_to_in_flight_limit" not in cells["raw/heatmap_on/c8"] and "ratio_to_in_flight_limit" not in cells["raw/heatmap_off/c1"]
    t = st.targets_of(cells, "raw", [1, 8])["heatmap_off_concurrency8_ratio"]
    assert t["value"] == 0.3 and t["meets"] is False and t["in_flight_limit"] == {"batch_per_process": 4, "img_s": 3000.0, "ratio": 0.4}
