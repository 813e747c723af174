# make run   - set up .venv and run the archiver on embedded defaults (mock source, embedded PostgreSQL, local store)
# make test  - set up .venv with the test tools and run the whole suite
# make bench - the benchmark, side by side with gallery-dl and dlt (starts its own services; scripts/bench/)
# make lint  - ruff
# make reliability - rewrite README's Reliability section from the last `make test` report

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: run test bench lint status clean reliability chromium

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10 or newer is needed (found " + sys.version.split()[0] + ")")'
	@echo "make: creating the virtual environment $(VENV) (first time only)"
	$(PYTHON) -m venv $(VENV)
	@echo "make: upgrading pip inside $(VENV)"
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(PY)
	@echo "make: installing the runtime dependencies of requirements.txt into $(VENV) (about a minute the first time):"
	@grep -Eo '^[A-Za-z0-9_.-]+' requirements.txt | tr '\n' ' ' | sed 's/^/make:   /'; echo
	$(PY) -m pip install --quiet -r requirements.txt
	@echo "make: dependencies installed"
	@touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(PY)
	@echo "make: installing the runtime and test dependencies (requirements-dev.txt) into $(VENV) (a minute or two the first time)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@echo "make: dependencies installed"
	@touch $@ $(VENV)/.runtime

# Apache Airflow, for the DAG tests only (users who do not run Airflow never install it).
$(VENV)/.airflow: requirements-airflow.txt | $(VENV)/.dev
	@echo "make: installing Apache Airflow for the DAG tests (requirements-airflow.txt; half a minute the first time)"
	$(PY) -m pip install --quiet -r requirements-airflow.txt
	@touch $@

run: $(VENV)/.runtime
	@echo "make: running the archiver (python etl.py run), then its fingerprints and report"
	$(PY) etl.py run; code=$$?; $(PY) etl.py fingerprint >/dev/null && $(PY) etl.py report; exit $$code

status: $(VENV)/.runtime
	$(PY) etl.py status

test: $(VENV)/.dev $(VENV)/.airflow chromium
	$(PY) -m pytest --junitxml=.test-report.xml

reliability: $(VENV)/.dev  # README's Reliability section from the last green `make test`
	$(PY) scripts/reliability_readme.py .test-report.xml

# The report's browser tests need Chromium from the distribution: installed when missing and we are root (CI).
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; fi

# The peers of the benchmark (gallery-dl, dlt), only for `make bench`.
$(VENV)/.bench: requirements-bench.txt | $(VENV)/.dev
	@echo "make: installing the benchmark's peers (requirements-bench.txt: gallery-dl, dlt[postgres])"
	$(PY) -m pip install --quiet -r requirements-bench.txt
	@touch $@

bench: $(VENV)/.dev $(VENV)/.bench  # every scenario, side by side with the peers; ARGS="--only images,metadata"
	$(PY) -m scripts.bench $(ARGS)

lint: $(VENV)/.dev
	$(PY) -m ruff check etl tests scripts dags etl.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
