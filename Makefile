# Two commands from a fresh clone: `make demo` and `make test`. Both set everything up.
# torch is pinned first so pip takes the CPU build (a bare `torch` requirement would pull CUDA).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
PYTEST := $(BIN)/python -m pytest -q -n 2 -p no:cacheprovider

.PHONY: demo test test-slow lint bench setup clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[demo,hf,dev]'
	touch $@

setup: $(VENV)/.ready

demo: $(VENV)/.ready
	$(BIN)/secateurs demo

test: $(VENV)/.ready
	$(BIN)/ruff check src tests bench
	$(PYTEST)

test-slow: $(VENV)/.ready
	$(BIN)/pip install -q --disable-pip-version-check -e '.[demo,hf,dev,eval]'
	$(PYTEST) -m slow

lint: $(VENV)/.ready
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info
