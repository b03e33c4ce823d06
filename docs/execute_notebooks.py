"""Execute the library notebooks (notebooks/lib/**) once into a build folder, for the docs.

    .venv/bin/python docs/execute_notebooks.py [--out _build/docs/lib] [--only GLOB ...] [--jobs N]

Each notebook runs with nbclient in this venv's kernel, in its own folder (as nbval runs it in
`make test`), and its executed copy (outputs kept) goes to OUT/<path under notebooks/lib>. nbdev's
`#|` directive lines are dropped from the copy and `#| hide` cells left out, so the page reads as
prose, code and results. A copy is reused while the notebook and the library (cvops/**.py) are
unchanged. A failing cell fails the build, naming the notebook: the docs never show a broken check.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "notebooks" / "lib"
DEFAULT_OUT = REPO / "_build" / "docs" / "lib"
STAMP_KEY = "cvops_docs_source_hash"
# TensorFlow's C++ start-up lines reach a cell's stderr even with TF_CPP_MIN_LOG_LEVEL=3 (absl logs
# before it reads the level): "WARNING: All log messages before absl::InitializeLog() ..." and
# "E0000 00:00:1795... cuda_dnn.cc:8310] Unable to register cuDNN factory ...".
TF_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|[EWIF]\d{4} [\d:.]+\s+\d+ \S+\.cc:\d+\])")
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3", "PLOOMBER_STATS_ENABLED": "false",
         "DISABLE_DEEPCHECKS_ANONYMOUS_TELEMETRY": "True", "DVC_NO_ANALYTICS": "1", "PYTHONWARNINGS": "ignore"}


def library_notebooks(only: list[str] | None = None) -> list[Path]:
    "The library notebooks, in path order; with `only`, those whose path under notebooks/lib matches a glob."
    found = sorted(p for p in LIB.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    if only:
        found = [p for p in found if any(p.relative_to(LIB).match(g) for g in only)]
    return found


def source_hash(nb: Path) -> str:
    "Hash of the notebook and of every library module: a change to either re-executes it."
    h = hashlib.sha256(nb.read_bytes())
    for mod in sorted((REPO / "cvops").rglob("*.py")):
        h.update(mod.relative_to(REPO).as_posix().encode() + mod.read_bytes())
    return h.hexdigest()


def is_current(out: Path, digest: str) -> bool:
    import nbformat
    if not out.exists():
        return False
    return nbformat.read(out, as_version=4).metadata.get(STAMP_KEY) == digest


def without_tf_noise(outputs: list) -> list:
    "The cell's outputs with TensorFlow's C++ log lines taken out of its stderr (an output left empty goes)."
    kept = []
    for out in outputs:
        if out.get("output_type") == "stream" and out.get("name") == "stderr":
            out["text"] = "".join(line for line in out["text"].splitlines(keepends=True) if not TF_NOISE.match(line))
            if not out["text"].strip():
                continue
        kept.append(out)
    return kept


def for_reading(nb):
    "The executed notebook as a page: nbdev directives (`#| export`, ...) and TensorFlow's log lines dropped, `#| hide` cells left out."
    page = copy.deepcopy(nb)
    cells = []
    for cell in page.cells:
        lines = cell.source.splitlines()
        if cell.cell_type == "code":
            if any(line.strip().startswith("#| hide") for line in lines):
                continue
            cell.source = "\n".join(line for line in lines if not line.startswith("#|")).strip("\n")
            cell.outputs = without_tf_noise(cell.get("outputs", []))
            if not cell.source and not cell.get("outputs"):
                continue
        cells.append(cell)
    page.cells = cells
    return page


def execute(nb_path: Path, out: Path, timeout: int = 900) -> float:
    "Run `nb_path` in its own folder and write its page to `out`; seconds taken."
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    os.environ.update(QUIET)
    started = time.monotonic()
    nb = nbformat.read(nb_path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(nb_path.parent)}})
    try:  # the kernel's own stderr (TensorFlow's C++ start-up lines) stays off the terminal; cell output is kept
        client.execute(stderr=subprocess.DEVNULL)
    except CellExecutionError as e:
        raise RuntimeError(f"{nb_path.relative_to(REPO)}: a cell failed\n{e}") from None
    page = for_reading(nb)
    page.metadata[STAMP_KEY] = source_hash(nb_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    nbformat.write(page, tmp)
    tmp.replace(out)
    return time.monotonic() - started


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the executed copies")
    ap.add_argument("--only", nargs="+", metavar="GLOB", help="only these notebooks (globs under notebooks/lib)")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("DOCS_JOBS", "1")), help="notebooks run at once")
    ap.add_argument("--force", action="store_true", help="execute even when an executed copy is current")
    args = ap.parse_args(argv)
    todo, out_of = [], {}
    for nb in library_notebooks(args.only):
        out_of[nb] = args.out / nb.relative_to(LIB)
        if args.force or not is_current(out_of[nb], source_hash(nb)):
            todo.append(nb)
    print(f"docs: {len(out_of)} library notebooks, {len(todo)} to execute", flush=True)
    failures = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = {nb: pool.submit(execute, nb, out_of[nb]) for nb in todo}
        for nb, run in runs.items():
            try:
                print(f"  {nb.relative_to(LIB)}: {run.result():.0f} s", flush=True)
            except Exception as e:  # report every failing notebook, then fail
                failures += 1
                print(f"  {nb.relative_to(LIB)}: FAILED\n{e}", file=sys.stderr, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
