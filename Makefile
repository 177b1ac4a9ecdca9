# Two commands a fresh clone needs (README.md):
#   make test   install into .venv and run the test suite (what CI runs)
#   make demo   install, build a dataset, train the tiny LongNet on CPU, export it
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint demo

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/activate
	# torch 2.13.0 first: the CPU build (on this project's machines it needs no download); the
	# requirements' range then accepts it instead of pulling a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .

demo: install
	PATH="$(abspath $(BIN)):$$PATH" PYTHON=$(abspath $(BIN))/python bash launch/demo.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint
	$(BIN)/python -m pytest -q
