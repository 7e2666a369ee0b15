# hubforge — the two commands a new machine needs (see README.md):
#   make demo   set up, then run the embedded default recipe end to end against a local Hub
#   make test   set up, then run every test tier that can run on this machine (what CI runs)
# GPU runner: make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128  (same torch version, CUDA build)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
TORCH_INDEX_URL ?=
LLAMA_CPP_PYTHON_VERSION := 0.3.36
LLAMA_CPP_DIR ?= .cache/llama.cpp
# llama.cpp is compiled for any x86-64 with AVX2, not for the build machine (-march=native): a native build on a CPU
# that advertises AMX inside a VM that does not enable it dies with SIGILL (`tilezero` in libggml-cpu) the first time
# a quantized file is evaluated, and a wheel built on one machine must run on the next. pip's wheel cache ignores
# CMAKE_ARGS, so the wheel is built once per version and flags into a folder of our own and installed from there.
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
LLAMA_WHEELS ?= $(HOME)/.cache/hubforge/wheels/llama-cpp-python-$(LLAMA_CPP_PYTHON_VERSION)$(subst $() ,,$(LLAMA_CPP_CMAKE_ARGS))
# llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity, llama-gguf-split), same source and
# flags as the runtime; the folder name must match hubforge.llamatools.tools_dir().
LLAMA_TOOLS ?= $(HOME)/.cache/hubforge/llama.cpp-tools-$(LLAMA_CPP_PYTHON_VERSION)$(subst $() ,,$(LLAMA_CPP_CMAKE_ARGS))
RECIPE ?= recipes/gemma-3-270m/persian-chat-lora.yaml
TIERS ?= unit or integration or hub or slow or browser or workflows

.PHONY: install llama-cpp-scripts llama-cpp-tools browser-deps lint-deps go-deps demo test test-unit standins benchmarks clean

install: $(VENV)/.installed llama-cpp-scripts

$(VENV)/.installed: pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and by exact version: an unpinned torch resolves to a multi-GB CUDA build on CPU machines.
	$(BIN)/pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	# llama-cpp-python compiles llama.cpp from source (~5 min on 2 cores) once per machine (see LLAMA_CPP_CMAKE_ARGS).
	test -n "$$(ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl 2>/dev/null)" || CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" \
	    CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip wheel -q --no-cache-dir --no-deps -w $(LLAMA_WHEELS) \
	    llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)
	$(BIN)/pip install -q --no-deps --force-reinstall $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# llama.cpp's own converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py and their gguf-py), taken from the
# sdist of the pinned llama-cpp-python so converter and runtime are the same llama.cpp version (README: "GGUF").
llama-cpp-scripts: $(LLAMA_CPP_DIR)/convert_hf_to_gguf.py

$(LLAMA_CPP_DIR)/convert_hf_to_gguf.py: | $(VENV)/.installed
	rm -rf .cache/sdist && mkdir -p .cache/sdist $(LLAMA_CPP_DIR)
	$(BIN)/pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION) -d .cache/sdist
	tar -xzf .cache/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION).tar.gz -C $(LLAMA_CPP_DIR) --strip-components=3 \
	    llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)/vendor/llama.cpp
	rm -rf .cache/sdist

# llama.cpp's tools for the importance matrix, per-tensor types, KL divergence and split files (hubforge.llamatools):
# compiled once per machine: 11.5 CPU-minutes measured (~6 minutes on 2 idle cores), too long for `install`, so
# hubforge.llamatools builds them on first use and says so. Needs cmake and a C++ compiler: apt-get install cmake g++.
llama-cpp-tools: $(LLAMA_TOOLS)/bin/llama-quantize

$(LLAMA_TOOLS)/bin/llama-quantize: | llama-cpp-scripts
	@command -v cmake >/dev/null && command -v c++ >/dev/null || \
	    { echo "llama-cpp-tools needs cmake and a C++ compiler: apt-get install cmake g++" >&2; exit 1; }
	HUBFORGE_LLAMA_CPP_DIR=$(LLAMA_CPP_DIR) $(BIN)/python -m hubforge.llamatools build "$(LLAMA_CPP_CMAKE_ARGS)"

# Headless Chromium for the Space's browser test (Debian packages; root, as on CI).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q chromium chromium-driver)

# shellcheck, which actionlint runs on every workflow script (tests/test_workflows.py; Debian package; root, as on CI).
lint-deps:
	@command -v shellcheck >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q shellcheck)

# Go, whose own text/template renders the Ollama `template` files in tests/test_ollama.py (Debian package; root, as on CI).
go-deps:
	@command -v go >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q golang-go)

demo: install
	$(BIN)/hubforge demo $(RECIPE)

test: install browser-deps lint-deps go-deps
	$(BIN)/python -m pytest -m "$(TIERS)" --durations=25

test-unit: $(VENV)/.installed
	$(BIN)/python -m pytest -m unit -q

# Every shipped recipe under --standin (embedded base, shipped sample data, 2 steps; README "Stand-in runs"), data → card.
standins: install
	set -e; for r in $$(find recipes -name '*.yaml' | sort); do \
	    echo "== $$r"; $(BIN)/hubforge run "$$r" --standin --quiet --run-dir "runs/standin/$$(basename $$(dirname $$r))-$$(basename $$r .yaml)"; \
	done

benchmarks: install
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/gguf_export.py
	$(BIN)/python benchmarks/gguf_export.py --quality
	$(BIN)/python benchmarks/hub.py
	$(BIN)/python benchmarks/space.py

clean:
	rm -rf $(VENV) .cache runs .hub-data
