# The two commands of the README:  `make run` (the pipeline on the quick-start config)
# and `make test` (the test suite). Both create the virtual environment when missing.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install run test test-fast lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/xlearner run --config configs/quickstart.yaml

test: install
	bash scripts/install-system-deps.sh
	$(BIN)/ruff check .
	$(BIN)/pytest -ra

test-fast: install
	$(BIN)/pytest -ra -m "not slow and not integration"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf .xlearner
