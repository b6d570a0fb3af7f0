# Two commands set up a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
# torch is installed FIRST and pinned (a CPU build lies on this machine's disk); a resolver left to
# choose torch on its own would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: venv test demo lint clean tokenizer

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# Rebuilds the shipped tiny tokenizer (tests/fixtures/tiny-tokenizer); deterministic.
tokenizer: $(VENV)/.installed
	$(PY) scripts/make_tiny_tokenizer.py tests/fixtures/tiny-tokenizer

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
