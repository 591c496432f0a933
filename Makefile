# Every target creates .venv itself on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HASH := $(shell cat pyproject.toml | md5sum | cut -c1-8)
# the demo needs the torch extra only (its evaluation runs the exported models in transformers); the tests add
# the dev and lm-eval extras on top, so `make demo` on a fresh machine installs no more than it runs
DEMO_STAMP := $(VENV)/.demo-$(HASH)
STAMP := $(VENV)/.installed-$(HASH)

.PHONY: demo test test-fast lint assets bench clean

$(DEMO_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade -q pip
	$(VENV)/bin/pip install -e '.[torch]'
	rm -f $(VENV)/.demo-*
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(VENV)/bin/pip install -e '.[torch,dev,lm-eval]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

assets: $(DEMO_STAMP)
	$(PY) tools/fetch_assets.py

demo: assets
	$(PY) tools/parity_report.py --model assets/smollm2-135m
	$(VENV)/bin/zhjax recipe --config configs/recipes/smollm2-zh-demo.yaml

# The tests also compile for TPU slices on this CPU host (zhjax plan), which needs libtpu: the `tpu` extra; and they
# run the exported GGUF files in llama.cpp (tests/test_gguf_llamacpp.py), which needs the `llamacpp` extra:
# llama-cpp-python built from its source distribution for this CPU (cmake + the system compiler, about 6 minutes on
# 2 cores; pip caches the wheel). Without ggml's AMX kernels: on CPUs with AMX (Intel Sapphire Rapids and later)
# `-march=native` compiles them in, and in llama.cpp 0.3.36's build their matrix product segfaults on these models'
# quantized files (ggml_backend_amx_mul_mat; llama.cpp issue 20824); the AVX-512 kernels run instead. A wheel pip
# cached from a build with them (this Makefile before 2026-12-04) is rebuilt once, without the cache.
TPU_STAMP := $(VENV)/.tpu-$(shell cat pyproject.toml | md5sum | cut -c1-8)
# (x86 only: the flags are x86 options, which compilers for ARM refuse)
NO_AMX := $(if $(filter x86_64 amd64 i686,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF \
	-DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)"
LLAMA_CPP_HAS_AMX := $(PY) -c "import llama_cpp, sys; sys.exit('AMX_INT8 = 1' not in llama_cpp.llama_print_system_info().decode())"

$(TPU_STAMP): $(STAMP)
	CMAKE_ARGS='$(LLAMA_CPP_CMAKE_ARGS)' $(VENV)/bin/pip install -q -e '.[torch,dev,lm-eval,tpu,llamacpp]'
	if $(LLAMA_CPP_HAS_AMX); then CMAKE_ARGS='$(LLAMA_CPP_CMAKE_ARGS)' $(VENV)/bin/pip install -q --no-cache-dir \
		--force-reinstall --no-deps "$$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)"; fi
	if $(LLAMA_CPP_HAS_AMX); then echo "make: llama-cpp-python still holds ggml's AMX kernels" >&2; exit 1; fi
	rm -f $(VENV)/.tpu-*
	touch $(TPU_STAMP)

# --durations: every run (CI's too) lists its slowest tests, so a suite drifting past its 30 minutes shows where
test: $(TPU_STAMP)
	$(PY) -m pytest -q --durations=25 tests

# The fast tier: every test but those marked slow (tests/conftest.py lists them, by measured time); no libtpu needed.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check zhjax tools tests bench

clean:
	rm -rf $(VENV) assets
