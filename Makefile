# make run   - set up .venv and run the archiver on embedded defaults (mock source, embedded PostgreSQL, local store)
# make test  - set up .venv with the test tools and run the whole suite
# make bench - throughput benchmark (starts its own services)
# make lint  - ruff
# make reliability - rewrite README's Reliability section from the last `make test` report

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: run test bench lint status clean reliability

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10 or newer is needed (found " + sys.version.split()[0] + ")")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@touch $@ $(VENV)/.runtime

run: $(VENV)/.runtime
	$(PY) etl.py run

status: $(VENV)/.runtime
	$(PY) etl.py status

test: $(VENV)/.dev
	$(PY) -m pytest --junitxml=.test-report.xml

reliability: $(VENV)/.dev  # README's Reliability section from the last green `make test`
	$(PY) scripts/reliability_readme.py .test-report.xml

bench: $(VENV)/.dev
	$(PY) scripts/bench.py $(ARGS)

lint: $(VENV)/.dev
	$(PY) -m ruff check etl tests scripts etl.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
