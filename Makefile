# Two entry points for a fresh clone: `make run` and `make test`. Each creates .venv when it is
# missing or older than pyproject.toml, so there is no separate install step to forget.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/hypertuna gateway --demo

lint: $(STAMP)
	$(BIN)/ruff check hypertuna tests bench
	$(BIN)/ruff format --check hypertuna tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict hypertuna

pytest: $(STAMP)
	$(BIN)/python -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python bench/relay_load.py --quick --spawn

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
