#!/usr/bin/env bash
# The project's virtual environment (`make venv`, and so `make run`, `make test`, `make docs`, .ci/run),
# in one line on the console; everything the installers print goes to the log file.
#   uv (pinned in constraints.txt) is bootstrapped into the venv with pip and installs requirements.txt
#   with constraints.txt, then `uv pip check`; where uv cannot be installed (no index that has it, say),
#   pip does the same work, only slower (minutes instead of under one).
# On failure: the log's last lines, its path, exit status 1.
# usage: scripts/install_venv.sh PYTHON VENV LOG
set -uo pipefail
python=$1 venv=$2 log=$3
start=$SECONDS
mkdir -p "$(dirname "$log")" && : >"$log" || { echo "error: cannot write the install log $log" >&2; exit 1; }
printf 'installing the Python environment into %s (log: %s) ... ' "$venv" "$log"

run() { echo "+ $*" >>"$log"; "$@" >>"$log" 2>&1; }
fail() {
  echo "failed after $((SECONDS - start)) s"
  { echo "--- the last lines of $log:"; tail -n 30 "$log"; echo "---"
    echo "error: the Python environment could not be installed: $1; the whole log: $log"; } >&2
  exit 1
}

[ -x "$venv/bin/python" ] || run "$python" -m venv "$venv" || fail "'$python -m venv $venv' failed"
py=$venv/bin/python
if run "$py" -m pip install --disable-pip-version-check uv -c constraints.txt && [ -x "$venv/bin/uv" ]; then
  tool=uv
  pip_install() { run "$venv/bin/uv" pip install --python "$py" "$@"; }
  pip_check() { run "$venv/bin/uv" pip check --python "$py"; }
else
  tool=pip
  echo "uv could not be installed (see above): pip installs instead" >>"$log"
  run "$py" -m pip install --disable-pip-version-check --upgrade "pip<26" || fail "pip could not be upgraded"
  pip_install() { run "$py" -m pip install --disable-pip-version-check "$@"; }
  pip_check() { run "$py" -m pip check; }
fi
pip_install -r requirements.txt -c constraints.txt || fail "$tool could not install requirements.txt with constraints.txt"
pip_install --no-deps --no-build-isolation -e . || fail "$tool could not install the cvops package (-e .)"
pip_check || fail "'$tool pip check' found conflicting requirements"
echo "done in $((SECONDS - start)) s ($tool)"
