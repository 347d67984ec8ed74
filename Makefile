# VisionChat developer commands. `make demo` and `make test` are the two set-up commands of the README:
# both create the virtual environment (with the project installed in it) and generate the stubs on first use.
SHELL := /bin/bash
PY_VERSION ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_WHEEL ?= $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl))
GEN := gen
PROTOS := $(shell find proto -name '*.proto')

.PHONY: setup system-deps node-deps stubs serve demo test bench bench-isolation bench-video bench-structured fuzz soak device-check lint python-checks clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PY_VERSION) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU torch build; a plain `pip install torch` would fetch several GB of CUDA wheels.
	if [ -n "$(TORCH_WHEEL)" ]; then $(PIP) install -q "$(TORCH_WHEEL)"; else $(PIP) install -q "torch>=2.13.0"; fi
	$(PIP) install -q -r requirements.txt -r requirements-dev.txt
	# The project itself, editable: `visionchat` and `visionchat-server` on the venv's PATH, importable from anywhere.
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

setup: system-deps $(VENV)/.installed $(GEN)/python/.stamp node-deps

# Debian packages (prometheus, protoc + gRPC plugins, node); skipped when already installed.
system-deps:
	bash tools/install-system-deps.sh

# npm packages of the Node client and the TypeScript/buf tooling, from client/node/package-lock.json.
node-deps: client/node/node_modules/.installed

client/node/node_modules/.installed: client/node/package.json client/node/package-lock.json
	cd client/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Python stubs go to gen/python, which a .pth file puts on the venv's import path.
$(GEN)/python/.stamp: $(PROTOS) $(VENV)/.installed
	rm -rf $(GEN)/python && mkdir -p $(GEN)/python
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$(GEN)/python --pyi_out=$(GEN)/python \
		--grpc_python_out=$(GEN)/python $(PROTOS)
	find $(GEN)/python -type d -exec touch {}/__init__.py \;
	rm -f $(GEN)/python/__init__.py
	echo "$(abspath $(GEN)/python)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/visionchat_gen.pth"
	touch $@

# Every language's stubs from proto/ only: Python (the project's own), Go, Java, C++, TypeScript.
stubs: setup
	bash tools/gen-stubs.sh

lint: setup
	client/node/node_modules/.bin/buf lint proto
	$(MAKE) --no-print-directory python-checks

# ruff (lint + format) and mypy on the server and the client: part of `make test`.
python-checks: $(VENV)/.installed $(GEN)/python/.stamp
	$(VENV)/bin/ruff check service client tools
	$(VENV)/bin/ruff format --check service client tools
	$(VENV)/bin/mypy

serve: setup
	$(PY) -m service $(ARGS)

# Start the server on the embedded default model, stream one real request, stop it.
demo: setup
	bash tools/demo.sh $(ARGS)

# Serving benchmark: concurrent streams side by side with one-at-a-time (see README, Performance).
bench: setup
	$(PY) bench/serving.py $(BENCH_ARGS)
	$(PY) bench/tls.py

# 10,000 random requests (hypothesis) against a live server; `make test` runs the same with fewer.
fuzz: setup
	FUZZ_EXAMPLES=10000 $(PY) -m pytest -q -s tests/test_fuzz.py

# A text stream's latency alone and next to heavy callers (8 MB prompts, 40-megapixel PNG floods, photos).
bench-isolation: setup
	$(PY) bench/isolation.py $(BENCH_ARGS)

# A clip sent as a video next to the same frames sent as images: bytes on the wire and TTFT.
bench-video: setup
	$(PY) bench/video.py $(BENCH_ARGS)

# Constrained streams (response formats) next to unconstrained ones; grammar compile times.
bench-structured: setup
	$(PY) bench/structured.py $(BENCH_ARGS)

# Constrained streams (response formats) next to unconstrained ones; grammar compile times.
bench-structured: setup
	$(PY) bench/structured.py $(BENCH_ARGS)

# Mixed clients for SOAK_MINUTES (default 30); RSS of every server process over time and its slope.
SOAK_MINUTES ?= 30
soak: setup
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

# Everything the first GPU/NPU run must show (parity, bf16, attention, memory, serving, workers), one report.
# VISIONCHAT_TEST_DEVICE picks the device (default cuda:0); =cpu is the dry run. See deploy/README.md.
device-check: setup
	$(PY) tools/device_check.py $(ARGS)

test: stubs python-checks
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(GEN) build
