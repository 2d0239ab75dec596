# covidseg: `make setup` once, then `make test`, `make run`, `make bench`. See README.md.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
UV := $(VENV)/bin/uv
export SM_FRAMEWORK := tf.keras
export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: setup system-deps test test-core test-service test-web bench bench-service soak fuzz run migrate clean

## setup: virtualenv with pinned Python deps, the `covidseg` console script, and system services if missing
setup: $(VENV)/.installed system-deps

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# uv installs the same pins as pip, 4x faster from PyPI (24 s against 104 s on the 2-core CI machine);
	@# pip does it when uv cannot be installed or cannot reach an index (pip also reads pip.conf's mirrors)
	@# uv leaves .pyc files to the first import (pip writes them at install: part of its 104 s)
	$(PIP) install -q uv || true
	$(UV) pip install -q --python $(PY) -r requirements.txt || $(PIP) install -q -r requirements.txt
	$(UV) pip install -q --python $(PY) --no-deps tf-keras==2.21.0 || $(PIP) install -q --no-deps tf-keras==2.21.0
	$(PIP) install -q --no-deps -e .
	touch $@

## system-deps: redis-server, chromium (browser tests) and PostgreSQL binaries from Debian, when missing and root
system-deps:
	@bash scripts/system_deps.sh

## test: the whole suite against real Redis, SeaweedFS (S3), PostgreSQL, SQLite, Celery, TF and Chromium
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-core: setup
	$(PY) -m pytest -q tests/core $(PYTEST_ARGS)

## test-service: job service only (real Redis, SeaweedFS, PostgreSQL + SQLite, gunicorn, a Celery worker)
test-service: setup
	$(PY) -m pytest -q tests/service $(PYTEST_ARGS)

## test-web: web interface + admin dashboard (Flask test client; headless Chromium against the real stack)
test-web: setup
	$(PY) -m pytest -q tests/web tests/browser $(PYTEST_ARGS)

bench: setup
	$(PY) -m cli bench --json artifacts/bench.json
	$(MAKE) --no-print-directory bench-service
	$(PY) scripts/bench_studies.py --json artifacts/bench_studies.json

## bench-service: submit latency p50/p99 at 1/10/50 clients + open loop, end-to-end slices/s (one worker, its pool of COVIDSEG_WORKER_CONCURRENCY processes)
bench-service: setup
	$(PY) scripts/bench_service.py --json artifacts/bench_service.json

## fuzz: schemathesis over every operation of the OpenAPI document on the real stack, 200 examples each, SQLite and PostgreSQL (make test: 12, PostgreSQL)
fuzz: setup
	COVIDSEG_FUZZ_EXAMPLES=200 COVIDSEG_FUZZ_BACKENDS=sqlite,postgresql $(PY) -m pytest -q tests/service/test_fuzz_openapi.py $(PYTEST_ARGS)

## soak: soak test with faults (2,000 jobs from 20 clients; worker kill, Redis/S3/PostgreSQL restarts), then reconciliation of DB and bucket; table + artifacts/soak.json
soak: setup
	$(PY) scripts/soak.py --json artifacts/soak.json

## cluster: several hosts on one machine (network namespaces, root): services, 2 API replicas, 2 worker hosts; one worker host cut off mid-batch; table + artifacts/cluster.json (CLUSTER_ARGS: e.g. --cut freeze)
.PHONY: cluster cluster-scale
cluster: setup
	$(PY) scripts/cluster.py run --json artifacts/cluster.json $(CLUSTER_ARGS)

## cluster-scale: throughput versus number of worker hosts (1, 2, 3) on this machine; artifacts/cluster_scale.json (docs/SCALING.md)
cluster-scale: setup
	$(PY) scripts/cluster.py scale --json artifacts/cluster_scale.json $(CLUSTER_ARGS)

## cv-train: train folds FOLDS (default "0 1") of recipe RECIPE in the background, THREADS (default 1) TF threads
## each: two 1-thread folds side by side use both cores. Logs: CV_RUN_ROOT/<recipe>-fold<K>.log; `make cv-status`
## shows progress. Data roots: COVID_ROOT, MEDSEG_ROOT (default ../shared/data/...). PRECISION=fp32 overrides a bf16
## recipe on a CPU without bf16 instructions. CV_NICE (default 19): the folds yield the CPU to tests and the
## service. Run it again to resume (the log is appended to; a fold still training is refused, see its train.lock).
## First `python -m training.cv plan --recipe R`. See docs/MODEL.md.
COVID_ROOT ?= ../shared/data/covid19-ct-seg-256
MEDSEG_ROOT ?= ../shared/data/medseg-100-train
CV_RUN_ROOT ?= runs/cv
FOLDS ?= 0 1
THREADS ?= 1
CV_NICE ?= 19
.PHONY: cv-train cv-status
cv-train: setup
	@test -n "$(RECIPE)" || { echo "usage: make cv-train RECIPE=<name> [FOLDS='0 1'] [THREADS=1]" >&2; exit 2; }
	@mkdir -p $(CV_RUN_ROOT)
	@for f in $(FOLDS); do \
	  nohup nice -n $(CV_NICE) $(PY) -m training.cv train --recipe $(RECIPE) --fold $$f --threads $(THREADS) \
	    $(if $(PRECISION),--precision $(PRECISION)) --covid-root $(COVID_ROOT) \
	    --medseg-root $(MEDSEG_ROOT) --run-root $(CV_RUN_ROOT) >> $(CV_RUN_ROOT)/$(RECIPE)-fold$$f.log 2>&1 & \
	  echo "fold $$f: pid $$!, log $(CV_RUN_ROOT)/$(RECIPE)-fold$$f.log"; \
	done

cv-status: setup
	@$(PY) -m training.cv status --run-root $(CV_RUN_ROOT)

## run: local stack without Docker (redis, SeaweedFS S3, SQLite, an interactive and a bulk worker, the API); prints URL and a token
run: setup
	$(PY) scripts/localstack.py run

## migrate: create/upgrade the job database schema (COVIDSEG_DATABASE_URL; default SQLite var/covidseg.db)
migrate: setup
	mkdir -p var
	$(VENV)/bin/alembic upgrade head

clean:
	rm -rf artifacts .pytest_cache
