# cvops: `make run` sets everything up and builds the pipeline on the default dataset;
# `make test` sets up what is missing and runs every test. `make help` lists the rest.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cvops-installed
MLFLOW_PORT ?= 5000
LAB_PORT ?= 8888
DASHBOARD_PORT ?= 8866
SERVICE_PORT ?= 8000
SERVICE_WORKERS ?= 2
VAR    := var
AIRFLOW_VENV  ?= .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.cvops-airflow-installed
export PLOOMBER_STATS_ENABLED := false
export DISABLE_DEEPCHECKS_ANONYMOUS_TELEMETRY := True
export DVC_NO_ANALYTICS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
# Python keeps the bytecode of what it imports (__pycache__): uv installs none, and with a PYTHONDONTWRITEBYTECODE from the
# caller's environment every process would compile TensorFlow's sources again (its import: 20 s of CPU instead of 7 on 2 cores)
unexport PYTHONDONTWRITEBYTECODE

FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: help setup system-deps venv airflow dataset run serve stop monitor dashboard test test-fast stack-rehearsal bench mlflow lab nb-inject nb-clean docs status clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: system-deps venv ## OS packages (when possible) + the virtual environment

# Without the package the dataset builder falls back (with a warning) to scikit-learn's digits;
# under CI (CI=true, set by .ci/run) there is no fallback: a missing package fails here.
NO_FASHION_MNIST = if case "$${CI:-}" in [Tt]rue|TRUE|1) true;; *) false;; esac; then \
	  echo "error: $(1); under CI (CI=$${CI}) there is no fallback to scikit-learn's digits: install the Debian package dataset-fashion-mnist" >&2; exit 1; \
	else echo "note: $(1); the dataset builder will fall back to scikit-learn's digits (see README 'The default dataset')"; fi

system-deps: ## install Debian's dataset-fashion-mnist (the default dataset) if it is missing
	@if [ -f $(FASHION_MNIST) ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing dataset-fashion-mnist (Debian package, 30 MB)"; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
	  { $(call NO_FASHION_MNIST,apt-get could not install dataset-fashion-mnist); }; \
	elif command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then \
	  sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null || { $(call NO_FASHION_MNIST,could not install dataset-fashion-mnist); }; \
	else $(call NO_FASHION_MNIST,cannot install dataset-fashion-mnist here (needs apt-get and root)); fi

venv: $(STAMP)

# One line on the console, the installers' output in $(INSTALL_LOG): uv (bootstrapped with pip, pinned in
# constraints.txt) installs in under a minute; pip is the fallback where uv cannot be installed.
INSTALL_LOG := $(VAR)/install.log

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@scripts/install_venv.sh "$(PYTHON)" "$(VENV)" "$(INSTALL_LOG)"
	@touch $@

# Airflow lives in an environment of its own, so .venv stays lean: the exported DAGs run the project's
# .venv/bin/cvops, never Airflow's python. uv (in .venv, or on PATH) installs it in seconds; pip otherwise.
AIRFLOW_UV = $(firstword $(wildcard $(BIN)/uv) $(shell command -v uv 2>/dev/null))

airflow: $(AIRFLOW_STAMP) ## Airflow 3 in its own environment, .venv-airflow (constraints-airflow.txt); see docs/airflow.md
	@echo "Airflow $$($(AIRFLOW_VENV)/bin/airflow version 2>/dev/null) in $(AIRFLOW_VENV); export the DAGs with: $(BIN)/cvops export airflow"

$(AIRFLOW_STAMP): requirements-airflow.txt constraints-airflow.txt
	@test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	@if [ -n "$(AIRFLOW_UV)" ]; then \
	  $(AIRFLOW_UV) pip install -q --python $(AIRFLOW_VENV)/bin/python -r requirements-airflow.txt -c constraints-airflow.txt \
	  && $(AIRFLOW_UV) pip check -q --python $(AIRFLOW_VENV)/bin/python; \
	else $(AIRFLOW_VENV)/bin/python -m pip install -q -r requirements-airflow.txt -c constraints-airflow.txt \
	  && $(AIRFLOW_VENV)/bin/python -m pip check; fi
	@touch $@

dataset: setup ## build datasets/fashion-mnist (git + DVC, tags v1.0.0 and v2.0.0) unless it exists
	@$(BIN)/cvops dataset build

# The console: one line for the install (its log in var/install.log), a line per pipeline task (and the train
# task's epochs), the test accuracy, the service's URLs; the notebooks' kernels write their own output to var/kernels.log.
run: dataset ## set up, build + deploy the pipeline on the default config, start the service, print the URLs
	@$(BIN)/cvops build
	@$(MAKE) --no-print-directory serve
	@echo "  experiments and the model registry (MLflow): make mlflow, then http://127.0.0.1:$(MLFLOW_PORT)/"
	@echo "  dashboards (drift monitor, service activity, rollout): make dashboard, then http://127.0.0.1:$(DASHBOARD_PORT)/"

serve: venv ## start the prediction service in the background (gunicorn, 2 workers); log in var/service.log
	@mkdir -p $(VAR)
	@test -s $(VAR)/admin_token || (umask 077; $(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(24))' > $(VAR)/admin_token)
	@chmod 600 $(VAR)/admin_token
	@ADMIN_TOKEN=$${ADMIN_TOKEN:-$$(cat $(VAR)/admin_token)} $(BIN)/cvops serve --detach --port $(SERVICE_PORT) --workers $(SERVICE_WORKERS)
	@echo "  predict: curl -F file=@image.png http://127.0.0.1:$(SERVICE_PORT)/predict"
	@echo "  deploy another version: .venv/bin/cvops models; .venv/bin/cvops deploy <model_name> --version <version>"
	@echo "  admin token for PUT /models/current: $(VAR)/admin_token; stop with: make stop"

stop: venv ## stop the prediction service (requests finish, the prediction log is flushed)
	@$(BIN)/cvops stop

monitor: venv ## one drift check of the serving version: a line per test; record under products/monitor/<run id>/
	$(BIN)/cvops monitor

dashboard: venv ## the Voila dashboards (drift monitor, service activity, rollout) on 127.0.0.1:8866 (DASHBOARD_PORT); Ctrl-C stops them
	@echo "  drift monitor:    http://127.0.0.1:$(DASHBOARD_PORT)/voila/render/drift_monitor.ipynb"
	@echo "  service activity: http://127.0.0.1:$(DASHBOARD_PORT)/voila/render/service_activity.ipynb"
	@echo "  rollout:          http://127.0.0.1:$(DASHBOARD_PORT)/voila/render/rollout.ipynb"
	@echo "  they read the service's database and central storage (CVOPS_ROOT, DB_URL, CVOPS_CENTRAL_STORAGE, .env)"
	@CVOPS_ROOT=$${CVOPS_ROOT:-$(CURDIR)} TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/voila notebooks/dashboards --no-browser \
	  --port=$(DASHBOARD_PORT) --Voila.ip=127.0.0.1

status: venv ## which pipeline tasks are up to date
	$(BIN)/ploomber status

# Two workers (pytest-xdist), each running one test file at a time, the longest files first (tests/conftest.py): many
# tests wait on other processes (kernels, servers, builds), so a fresh clone's suite took 26.5 minutes on 2 cores instead
# of 56 in one process. TEST_JOBS=0: one process.
TEST_JOBS ?= 2
PYTEST_JOBS = $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder)

test: setup ## run every test: notebook checks (nbval), integration and end-to-end (TEST_JOBS=2 workers)
	$(BIN)/pytest $(PYTEST_JOBS)

test-fast: venv ## everything but the end-to-end pipeline runs
	$(BIN)/pytest $(PYTEST_JOBS) -m "not e2e"

# The rehearsal merges docker-compose.s3.yml onto docker-compose.yml (central storage and MLflow's artefacts on SeaweedFS,
# as `docker-compose -f docker-compose.yml -f docker-compose.s3.yml`); REHEARSAL_STORAGE=local rehearses the base file alone.
stack-rehearsal: venv ## start docker-compose.yml + docker-compose.s3.yml natively (cvops.rehearsal: same commands, env, config files) on a tiny config and print the figures
	@mkdir -p $(VAR)   # pytest makes --basetemp itself, but not its parent
	$(BIN)/pytest -q -s -p no:randomly --basetemp=$(VAR)/stack-rehearsal tests/test_stack_rehearsal.py 2>&1 | \
	  grep -E '^(stack up|  [a-z_-]+ +(healthy|completed|not run|started)|rehearsal figures|  [a-z ]+: |    +[0-9]+  |total|[0-9]+ (passed|failed|skipped)|FAILED|E  )' ; \
	  exit $${PIPESTATUS[0]}

bench: dataset ## a fresh clone's make run timed; training throughput; service req/s + latency; drift-test quality (both backends; in-process and end to end through the service); a whole monitoring run over 100k logged predictions; the estimated accuracy vs the true one per shift; the cost of a shadow rollout; the speed targets in one table (summary.md) -> bench/results/
	$(BIN)/python bench/first_run.py
	@# the benches below use the deployed version, the model users get (a weak stand-in made its drift figures meaningless):
	@# the default pipeline is built and deployed here first, a no-op when it is up to date
	$(BIN)/cvops build
	@# two rounds: one moved the ratio by several percent between runs of the same code (0.927 against 0.997)
	$(BIN)/python bench/train_throughput.py --rounds 2
	$(BIN)/python bench/service_throughput.py
	$(BIN)/python bench/drift_quality.py
	$(BIN)/python bench/drift_e2e.py
	$(BIN)/python bench/monitor_throughput.py
	$(BIN)/python bench/estimated_accuracy.py
	$(BIN)/python bench/shadow_cost.py
	$(BIN)/python bench/summary.py

mlflow: venv ## the MLflow UI on the local store
	$(BIN)/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlruns/mlflow.db}" --host 127.0.0.1 --port $(MLFLOW_PORT)

# `make lab` opens the pipeline's task notebooks as the pipeline would run them: `ploomber nb
# --inject` adds a cell tagged injected-parameters with the current config's parameters and the
# paths of the task's products and upstream products; when JupyterLab stops (Ctrl-C, or an error),
# `make nb-clean` removes that cell again, so it never reaches a commit. See docs/lab.md.
# (PYTHONWARNINGS: ploomber warns that every notebook "appears more than once"; none does.)
PLOOMBER_NB := PYTHONWARNINGS=ignore::UserWarning:ploomber.cli.nb $(BIN)/ploomber nb
TASK_NOTEBOOKS := notebooks/pipeline

lab: venv ## JupyterLab on the project; the task notebooks get the config's parameters until it stops
	@$(MAKE) --no-print-directory nb-inject
	@trap 'trap "" INT TERM; $(MAKE) --no-print-directory nb-clean' EXIT; \
	  $(BIN)/jupyter lab --no-browser --port $(LAB_PORT)

nb-inject: venv ## add the config's parameters + upstream product paths to the pipeline's task notebooks
	@$(PLOOMBER_NB) --inject >/dev/null
	@echo "injected the parameters of configs/config.yaml (env.yaml) into $(TASK_NOTEBOOKS)/*.ipynb; make nb-clean removes them"

nb-clean: venv ## remove the injected parameter cells (and outputs) from the pipeline's task notebooks
	@$(PLOOMBER_NB) --remove >/dev/null || { echo "error: could not remove the injected cells: the pipeline does not load (see above); fix configs/config.yaml, then make nb-clean" >&2; exit 1; }
	@$(BIN)/nbdev-clean --fname $(TASK_NOTEBOOKS)
	@echo "removed the injected cells and outputs from $(TASK_NOTEBOOKS)/*.ipynb"

DOCS_JOBS ?= 1
docs: venv ## the docs site in site/: docs/ pages + the library notebooks, executed (copies in _build/docs/)
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python docs/execute_notebooks.py --jobs $(DOCS_JOBS)
	TF_CPP_MIN_LOG_LEVEL=3 NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --quiet
	@echo "docs: site/index.html (or $(BIN)/mkdocs serve for a live preview)"

clean: ## remove pipeline products (keeps datasets, MLflow runs and central storage)
	rm -rf products
