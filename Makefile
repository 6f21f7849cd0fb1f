# The two commands of the README: `make demo` and `make test`. Both create (or reuse) .venv inside the clone and
# install what they need; nothing beyond Python 3.11 is assumed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch/timm are only for the export-parity tests; the pins are the builds this project is tested with.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# Re-install when the dependency list changes.
DEPS_HASH := $(shell cksum < pyproject.toml | cut -d' ' -f1)
BASE_STAMP := $(VENV)/.base-$(DEPS_HASH)
TORCH_STAMP := $(VENV)/.torch-$(DEPS_HASH)
CONVERT_STAMP := $(VENV)/.convert-$(DEPS_HASH)
PYTEST_ARGS ?=

.PHONY: demo test test-slow install clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or: make PYTHON=python3 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(BASE_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[test,dicom]'
	@rm -f $(VENV)/.base-*
	@touch $@

$(TORCH_STAMP): $(BASE_STAMP)
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[torch]'
	@rm -f $(VENV)/.torch-*
	@touch $@

# The convert extra (TensorFlow, apache-beam, mlcroissant) is for the `tfds build` CLI test only; it resolves
# alongside jax and torch without changing their versions. Installed after torch so pip runs one at a time.
$(CONVERT_STAMP): $(TORCH_STAMP)
	$(BIN)/pip install --quiet -e '.[convert]'
	@rm -f $(VENV)/.convert-*
	@touch $@

install: $(BASE_STAMP)

demo: $(BASE_STAMP)
	$(BIN)/vasomim demo --out=demo_out

test: $(CONVERT_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: $(CONVERT_STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
