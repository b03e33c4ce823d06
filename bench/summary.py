"""The speed targets (a first run in minutes, a service near its in-process limit, a monitor run under a second) in one table, each next to its limit or target, read from the benchmarks' results in bench/results/.

    first run   first_run.json          `make run` in a fresh clone, all in (<= 480 s), the train task (<= 180 s), the test
                                        accuracy it reached (>= 0.92), the no-op rebuild (< 3 s), noise lines printed (0)
    train       train_throughput.json   the train task's input pipeline / the bare fit on decoded tensors in memory, over all
                                        epochs (>= 0.93)
    service     service_throughput.json at concurrency 8, requests/s / the batched in-process images/s, heatmaps off (>= 0.6)
                                        and on (>= 0.7); p99 at concurrency 1, heatmaps off (< 10 ms); the durable log's cost
                                        (<= 15 %); beside the heatmaps-off figure, the CPU per request the target would leave the
                                        service (the run's `ceiling`) against what the in-process path and the bare server cost
    monitor     monitor_throughput.json a monitoring run over 100,000 logged predictions (< 1 s)

A result file that is missing is listed as not run; each row says when its file was written, as the files may come from
different runs (`make bench` writes them all, then this table). Writes summary.json and summary.md next to them.

    python bench/summary.py [--results bench/results]
"""
import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _read(folder: Path, name: str) -> dict | None:
    try: return json.loads((folder / name).read_text())
    except (OSError, ValueError): return None


def row(area, figure, value, target, met, limit=None, when=None, unit=""):
    return {"area": area, "figure": figure, "value": value, "unit": unit, "target": target, "met": met, "limit": limit, "when": when}


def first_run_rows(r: dict | None) -> list:
    if r is None: return [row("first run", "make run in a fresh clone", None, "<= 480 s", None)]
    when, t, f = r.get("when"), r["targets"], r["figures"]
    cache = f"{r.get('package_cache', '?')} package cache"
    labels = {"make_run_s": (f"make run in a fresh clone ({cache})", "s"), "train_task_s": ("the train task", "s"),
              "test_accuracy": ("test accuracy of the default model", ""), "noop_rebuild_s": ("no-op rebuild (cvops build)", "s"),
              "noise_lines": ("noise lines printed by make run", "")}
    return [row("first run", label, f[key], t[key]["target"], t[key]["met"], when=when, unit=unit)   # the targets first_run.py judged
            for key, (label, unit) in labels.items()]


def train_rows(r: dict | None) -> list:
    if r is None: return [row("train", "input pipeline / bare fit", None, ">= 0.93", None)]
    limit = f"bare fit {r['bare_fit']['steady_img_s']:.0f} img/s; pipeline {r['pipeline']['steady_img_s']:.0f} img/s (steady)"
    return [row("train", "input pipeline / bare fit in memory, all epochs", round(r["ratio_all_epochs"], 3), f">= {r['target_ratio']}",
                r["ratio_all_epochs"] >= r["target_ratio"], limit=limit, when=r.get("when"))]


def service_rows(r: dict | None) -> list:
    if r is None: return [row("service", "heatmaps off, concurrency 8 / in-process", None, ">= 0.6", None)]
    when, t = r.get("when"), r["targets"]["raw"]
    out = []
    for key, label in (("heatmap_off_concurrency8_ratio", "heatmaps off, concurrency 8 / in-process"),
                       ("heatmap_on_concurrency8_ratio", "heatmaps on, concurrency 8 / in-process")):
        c = t[key]
        limit = f"{c['service_req_s']:.0f} req/s vs {c['in_process_img_s']:.0f} img/s ({c['compared_with']})"
        if (fl := c.get("in_flight_limit")):
            limit += (f"; against the in-process figure with no more images in flight than the clients keep (batch "
                      f"{fl['batch_per_process']} per process, {fl['img_s']:.0f} img/s): {fl['ratio']:.3f}")
        if key.startswith("heatmap_off") and (budget := ceiling_budget(r.get("ceiling"))): limit += f"; {budget}"
        out.append(row("service", label, c["value"], f">= {c['target']}", c["meets"], when=when, limit=limit))
    c = t["heatmap_off_concurrency1_p99_ms"]
    out.append(row("service", "p99, heatmaps off, concurrency 1", c["value"], f"< {c['target_below']}", c["meets"], when=when, unit="ms"))
    d = r.get("durability")
    if isinstance(d, dict) and d.get("cost_c8") is not None:
        out.append(row("service", "durable prediction log's cost, concurrency 8", round(d["cost_c8"], 3),
                       f"<= {d['target_cost_concurrency8']}", d["meets_target"], when=when,
                       limit=f"durable / async = {d['ratio_durable_to_async_c8']:.3f}"))
    return out


def ceiling_budget(ce: dict | None) -> str | None:
    """What the heatmaps-off target leaves per request, from the same run (service_throughput's `ceiling`): the service's CPU
    per request at 0.6 of the in-process figure, against the in-process path's own CPU per image plus the bare server's."""
    if not ce or ce.get("service_cpu_ms_per_request_at_target") is None: return None
    per = ce.get("server_cpu_ms_per_request") or {}
    server = per[max(per, key=lambda k: int(k[1:]))] if per else None   # at the target's concurrency (the higher one)
    return (f"at the target the service would have {ce['service_cpu_ms_per_request_at_target']:.3f} ms CPU/request; the in-process "
            f"path takes {ce.get('in_process_cpu_ms_per_image_batch8') or float('nan'):.3f} ms/image at batch 8, the bare server "
            f"{server if server is not None else float('nan'):.3f} ms/request")


def monitor_rows(r: dict | None) -> list:
    if r is None: return [row("monitor", "monitoring run over 100,000 predictions", None, "< 1 s", None)]
    m = r["median_seconds"]["all_rows"]
    return [row("monitor", f"monitoring run over {int(m['n_rows']):,} predictions", m["run"], f"< {r['target_s']}", r["met"], unit="s",
                limit=f"reading the same blobs in one query: {m['limit_read']:.3f} s", when=r.get("created"))]


def summarise(folder: Path) -> list:
    return (first_run_rows(_read(folder, "first_run.json")) + train_rows(_read(folder, "train_throughput.json"))
            + service_rows(_read(folder, "service_throughput.json")) + monitor_rows(_read(folder, "monitor_throughput.json")))


def verdict(met) -> str: return "met" if met else "not met" if met is False else "not run"


def markdown(rows: list) -> str:
    lines = ["| area | figure | value | target | | measured against | written |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']}{' ' + r['unit'] if r['unit'] else ''}"
        lines.append(f"| {r['area']} | {r['figure']} | {value} | {r['target']}{' ' + r['unit'] if r['unit'] else ''} | "
                     f"{verdict(r['met'])} | {r['limit'] or ''} | {r['when'] or ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    folder = Path(ap.parse_args(argv).results)
    rows = summarise(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(rows, indent=1))
    (folder / "summary.md").write_text(markdown(rows))
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']}{r['unit'] and ' ' + r['unit']}"
        print(f"{r['area']:10s} {r['figure']:52s} {value:>10s}  target {r['target']:>7s}{r['unit'] and ' ' + r['unit']:3s} {verdict(r['met'])}")
    print(f"-> {folder / 'summary.md'}")
    return rows


if __name__ == "__main__":
    main()
