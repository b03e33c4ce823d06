"""What a rollout costs the service's throughput (issue 14): the same `cvops serve` (2 workers, durable log, heatmaps off,
raw PNG bodies, concurrency 8, the load generator of bench/service_throughput.py) without a rollout and with a candidate
in shadow for 10 % and for 100 % of requests. The reference is the same service without a rollout, measured in the same
run; cells alternate over `--rounds` rounds and the medians are reported. (No canary cell: the load generator's
connections share one address and send no X-Client-ID, so a canary would send all of them or none to the candidate.)

The candidate is a second published copy of the serving version (the same model, so the figures are the cost of running a
candidate of the serving version's size, not of a bigger or smaller one): in shadow each shadowed request costs one more
decode and model call in the inference thread, after its answer.
The rollout is started and aborted through central storage (`cvops.registry.rollout`), and every cell waits until every
worker reports the candidate it should run.

    python bench/shadow_cost.py [--duration 8] [--warmup 2] [--rounds 2] [--out bench/results/shadow_cost.json]
"""
import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import service_throughput as st  # noqa: E402  (the load generator, the service and the model of the throughput bench)

CELLS = (("none", None, 0.0), ("shadow 10%", "shadow", 0.1), ("shadow 100%", "shadow", 1.0))


def workers_candidate(var: Path, want, timeout: float = 60) -> dict:
    "pid -> candidate of the service's live workers, once every one reports `want` (their status files)."
    from cvops.predlog.spill import pid_alive
    deadline, seen = time.time() + timeout, {}
    while time.time() < deadline:
        seen = {}
        for f in (var / "workers").glob("*.json"):
            try: d = json.loads(f.read_text())
            except ValueError: continue
            if pid_alive(d["pid"]): seen[d["pid"]] = d.get("candidate")
        if seen and set(seen.values()) == {want}: return seen
        time.sleep(0.2)
    raise RuntimeError(f"the workers did not all report candidate {want} within {timeout:g} s: {seen}")


def set_rollout(storage: Path, var: Path, name: str, candidate: str, mode, fraction: float):
    "Start (or, with `mode` None, end) the rollout and wait until every worker follows."
    from cvops.registry.rollout import abort_rollout, current_candidate, start_rollout
    if current_candidate(storage) is not None: abort_rollout(storage, by="bench", reason="next cell")
    if mode is None: return workers_candidate(var, None)
    start_rollout(storage, name, candidate, mode, fraction, by="bench", reason="bench/shadow_cost.py")
    return workers_candidate(var, candidate)


def main(argv=None):
    from cvops.quiet import quiet_tensorflow
    quiet_tensorflow()   # TensorFlow's start-up lines (CUDA factories, cuInit) stay out of the bench's output
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/config.yaml", help="its model section is trained when nothing is deployed")
    ap.add_argument("--duration", type=float, default=8, help="seconds measured per cell")
    ap.add_argument("--warmup", type=float, default=2, help="seconds of load before each measured window")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--out", default="bench/results/shadow_cost.json")
    args = ap.parse_args(argv)
    from cvops.config import find_project_root
    from cvops.registry.publish import publish_model
    from cvops.registry.versions import version_metadata
    project = find_project_root()
    with tempfile.TemporaryDirectory(prefix="cvops-shadow-bench-") as tmp:
        work = Path(tmp) / "project"
        model = st.prepare_storage(project, work, project / args.config)
        storage = work / "central_storage"
        meta = version_metadata(model["folder"])
        candidate = publish_model(model["folder"], {k: v for k, v in meta.items() if k not in ("version", "model_dir")}, storage)["version"]
        _, bodies = st.request_bodies(args.images)
        body, ctype = bodies["raw"]
        svc = st.bench_service(work, 2, model["version"])
        raw = {label: [] for label, _, _ in CELLS}
        try:
            for r in range(args.rounds):
                for label, mode, fraction in CELLS:
                    set_rollout(storage, work / "var", model["model_name"], candidate, mode, fraction)
                    cell = st.service_cell(svc, body, ctype, False, args.concurrency, args.warmup, args.duration)
                    raw[label].append(cell)
                    print(f"round {r + 1} {label:12s} {cell['req_s']:8.1f} req/s  p99 {cell['p99_ms']:6.2f} ms  "
                          f"errors {cell['errors']}", flush=True)
            set_rollout(storage, work / "var", model["model_name"], candidate, None, 0)
        finally:
            svc.stop()
    med = lambda xs: statistics.median(xs) if xs else None
    base = med([c["req_s"] for c in raw["none"]])
    summary = {label: {"req_s": round(med([c["req_s"] for c in cells]), 1),
                       "p99_ms": round(med([c["p99_ms"] for c in cells]), 2),
                       "errors": sum(c["errors"] for c in cells),
                       "vs_no_rollout": round(med([c["req_s"] for c in cells]) / base, 3) if base else None}
               for label, cells in raw.items()}
    out = {"when": datetime.now(timezone.utc).isoformat(), "machine": {"cpus": st.os.cpu_count(), "python": platform.python_version()},
           "model": model, "concurrency": args.concurrency, "heatmap": False, "body": "raw PNG", "rounds": args.rounds,
           "duration_s": args.duration, "summary": summary, "cells": raw}
    path = Path(args.out); path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"\nrollout cost at concurrency {args.concurrency}, heatmaps off (medians of {args.rounds} rounds; reference: no rollout, same run)")
    print(f"{'rollout':14s} {'req/s':>9s} {'p99 ms':>8s} {'vs none':>8s} {'errors':>7s}")
    for label, s in summary.items():
        print(f"{label:14s} {s['req_s']:9.1f} {s['p99_ms']:8.2f} {s['vs_no_rollout']:8.3f} {s['errors']:7d}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
