"""The environment set-up (`make venv`, which `make run`, `make test`, `make docs` and .ci/run go through): one console line,
the installers' output in a log file; a failure shows the log's last lines and its path and exits non-zero; uv is pinned
like every other package."""
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "install_venv.sh"


def test_a_failed_install_says_why_and_where_its_log_is(tmp_path):
    log = tmp_path / "var" / "install.log"
    p = subprocess.run([str(SCRIPT), str(tmp_path / "no-such-python"), str(tmp_path / ".venv"), str(log)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert re.fullmatch(rf"installing the Python environment into {re.escape(str(tmp_path))}/\.venv \(log: {re.escape(str(log))}\) "
                        r"\.\.\. failed after \d+ s\n", p.stdout), p.stdout          # one line on stdout
    assert f"--- the last lines of {log}:" in p.stderr and "no-such-python" in p.stderr, p.stderr
    assert p.stderr.rstrip().endswith(f"the whole log: {log}"), p.stderr
    assert "no-such-python" in log.read_text() and not (tmp_path / ".venv").exists()


def test_every_entry_point_sets_up_through_the_script():
    for target in ("venv", "run", "test", "docs"):
        p = subprocess.run(["make", "-n", target, "VENV=/nonexistent-cvops-venv"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, (target, p.stderr)
        setup = [line for line in p.stdout.splitlines() if "install" in line and "venv" in line]
        assert setup[:1] == ['scripts/install_venv.sh "python3" "/nonexistent-cvops-venv" "var/install.log"'], (target, p.stdout[:1500])
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_uv_is_pinned():
    pins = re.findall(r"^uv==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    assert len(pins) == 1, pins
