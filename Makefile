# Quick start on a fresh machine with Python 3.11:
#   make demo   # sets up .venv and runs the main job on the embedded default
#   make test   # sets up .venv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first and alone: with the pin, pip takes the local CPU build here and the CUDA build on a
# GPU machine; every later install runs under constraints.txt so nothing can swap it.
TORCH_PIN := torch==2.13.0
EXTRAS := onnx,triton,train,serve,ray,dev

.PHONY: setup demo test test-fast clean native

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.setup-done: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt $(TORCH_PIN)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[$(EXTRAS)]'
	# CLIP's BPE vocabulary ships in this wheel; --no-deps because its imports need torchvision.
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps open_clip_torch
	touch $@

setup: $(VENV)/.setup-done

# The C++ step/composite ops (and CUDA ones with a CUDA torch + toolkit): cmake + ninja from the [native]
# extra, then a CMake build installed at cg4ctr_fast/kernels/_lib/ (see `cg4ctr-native info`).
$(VENV)/.native-tools: $(VENV)/.setup-done
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[native]'
	touch $@

native: $(VENV)/.native-tools
	$(BIN)/cg4ctr-native build

demo: setup
	$(BIN)/cg4ctr demo --out out/demo --overwrite

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf out .pytest_cache
