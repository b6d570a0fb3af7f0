# Two commands set up a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
# torch is installed FIRST and pinned (a CPU build lies on this machine's disk); a resolver left to
# choose torch on its own would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

# transformers 4.x beside it (vLLM pins transformers >=4.56,<5 and loads a converted folder's remote
# code): a folder that tests/test_transformers4.py puts first on sys.path of .venv's Python, so torch,
# numpy, accelerate, ... are .venv's. --no-deps: only what 4.57 needs in other versions than .venv has
# (tokenizers <0.23, huggingface_hub <1 and the requests it imports), pinned.
TF4 := .venv-tf4
TF4_PACKAGES := transformers==4.57.3 tokenizers==0.22.2 huggingface_hub==0.36.2 requests==2.34.2 \
	urllib3==2.8.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3

.PHONY: venv venv-tf4 test demo lint clean tokenizer

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

$(TF4)/.installed: Makefile $(VENV)/.installed
	rm -rf $(TF4)
	$(PY) -m pip install -q --no-deps --target $(TF4) $(TF4_PACKAGES)
	touch $@

venv-tf4: $(TF4)/.installed

# Whole test files go to each of TEST_WORKERS processes (pytest-xdist --dist loadfile): module
# fixtures are built once, and half the suite's time is imports, subprocesses and I/O that two cores
# overlap. --no-loadscope-reorder: files go out in the order tests/conftest.py gives (longest first),
# not by their number of tests. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: $(VENV)/.installed $(TF4)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# Rebuilds the shipped tiny tokenizer (tests/fixtures/tiny-tokenizer); deterministic.
tokenizer: $(VENV)/.installed
	$(PY) scripts/make_tiny_tokenizer.py tests/fixtures/tiny-tokenizer

clean:
	rm -rf $(VENV) $(TF4) build *.egg-info .pytest_cache .ruff_cache
