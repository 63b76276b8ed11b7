# Every target sets up what it needs: `make demo` and `make test` work on a fresh machine with only Python.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1
STAMPS := .stamps
NATIVE_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h) setup.py pyproject.toml

.PHONY: install demo test test-build lint bench bench-smoke gpu-check wheel wheel-cuda cmake-test clean

install: $(STAMPS)/install

$(STAMPS)/venv:
	@mkdir -p $(STAMPS)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@touch $@

# torch and triton only when they are not importable (a user's GPU machine keeps its own CUDA torch and triton;
# the package runs with torch >= 2.4 and triton >= 3.2).
$(STAMPS)/deps: $(STAMPS)/venv
	$(VPY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(VPY) -c "import triton" 2>/dev/null || $(PIP) install $(TRITON_SPEC)
	$(PIP) install numpy ninja "setuptools>=69" wheel pytest pytest-benchmark hypothesis ruff \
		scikit-learn matplotlib tqdm scipy transformers==5.24.0
	@touch $@

$(STAMPS)/install: $(STAMPS)/deps $(NATIVE_SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	@touch $@

# The time-to-accuracy study on sklearn's bundled digits with the small CNN, every available optimizer:
# writes out/demo/table.md, results.json and accuracy.png (a few minutes on 2 CPU cores).
demo: install
	$(VPY) -m fop_kernels
	$(VPY) -m fop_train --data digits --model cnn --batch-sizes 1024,full --seeds 0,1,2 --epochs 40 \
		--target 95 --curvature-interval 1 --out out/demo

test: install
	$(VPY) -m pytest -q tests

# The slow build tests: the CPU wheel in a fresh venv, and the CUDA wheel checks (skipped without .venv-cuda).
test-build: install
	$(VPY) -m pytest -q -m slow tests/test_wheel.py tests/test_build.py

lint: install
	$(VPY) -m ruff check fop_kernels python tests bench examples

# Every microbenchmark in bench/micro (each op against its reference and plain torch, one group per case);
# a summary table at the end, the pytest-benchmark JSON in out/bench/micro.json (not yet timed end to end).
bench: install
	@mkdir -p out/bench
	$(VPY) -m pytest bench/micro --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,rounds \
		--benchmark-json=out/bench/micro.json

# CI: every microbenchmark on tiny shapes, one round (well under a minute); fails when none is collected or a
# collected file times nothing, so a benchmark that breaks or stops being collected fails CI.
bench-smoke: install
	@mkdir -p out/bench
	$(VPY) -m pytest bench/micro --smoke --benchmark-only -q --benchmark-columns=median \
		--benchmark-json=out/bench/smoke.json

# On a machine with a CUDA GPU: validates and times every GPU path in at most 8 minutes (bench/gpu_check.py).
# It uses that machine's own python, torch (>= 2.4) and triton (>= 3.2): no venv, no network, no pinned torch;
# it builds the extension in place itself. Report: under FOP_GPU_CHECK_OUT (default out/gpu-check/). Without CUDA it
# prints "no CUDA device: nothing to check" and the plan, and exits 0.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=$(CURDIR):$(CURDIR)/python $(GPU_PYTHON) bench/gpu_check.py

clean:
	rm -rf build dist *.egg-info $(STAMPS) fop_kernels/_C*.so

# ---- wheels and the CMake build ----
# `make wheel`: the CPU wheel (+cpu) into dist/, built against the torch in $(VENV).
# `make wheel-cuda`: a +cu130 wheel built in $(CUDA_VENV) against the CUDA torch ($(CUDA_TORCH_SPEC)), the nvcc
# toolkit at $(CUDA_HOME_BUILD) and the cuSOLVER of the nvidia wheels in that venv; then the .so is checked.
# The CUDA wheel compiles in build/wheel-cuda (FOP_KERNELS_BUILD_BASE), so it never touches the CPU objects in build/.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
# The toolkit: $(CUDA_HOME) if set, else /usr/local/cuda, else the one the nvcc on PATH resolves into.
CUDA_HOME_BUILD ?= $(firstword $(wildcard $(CUDA_HOME) /usr/local/cuda) \
	$(shell nvcc_path=$$(command -v nvcc) && dirname $$(dirname $$(readlink -f $$nvcc_path))))
CUDA_ARCHS ?= 8.0;9.0

# The CPU wheel shares build/ with `setup.py build_ext --inplace` (same flags, so ninja reuses its objects),
# under the same lock that in-place builds take.
BUILD_LOCK := $(if $(shell command -v flock),flock /tmp/fop_build.lock,)

wheel: install
	rm -rf dist/fop_kernels-*+cpu-*.whl build/bdist-cpu
	FOP_KERNELS_FORCE_CPU=1 $(BUILD_LOCK) $(VPY) setup.py -q bdist_wheel --bdist-dir build/bdist-cpu --dist-dir dist
	ls dist/fop_kernels-*+cpu-*.whl

$(STAMPS)/venv-cuda:
	@mkdir -p $(STAMPS)
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -c "import torch; assert torch.version.cuda" 2>/dev/null || \
		$(CUDA_VENV)/bin/python -m pip install $(CUDA_TORCH_SPEC)
	$(CUDA_VENV)/bin/python -m pip install "setuptools>=69" wheel ninja numpy
	@touch $@

wheel-cuda: $(STAMPS)/venv-cuda
	test -n "$(CUDA_HOME_BUILD)" || { echo "nvcc not found: set CUDA_HOME_BUILD to a CUDA toolkit"; exit 1; }
	rm -rf dist/fop_kernels-*+cu*-*.whl
	CUDA_HOME=$(CUDA_HOME_BUILD) FOP_KERNELS_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MAX_JOBS=2 \
		FOP_KERNELS_BUILD_BASE=build/wheel-cuda \
		$(CUDA_VENV)/bin/python setup.py -q bdist_wheel --bdist-dir build/wheel-cuda/bdist --dist-dir dist
	rm -rf build/wheel-cuda/check && mkdir -p build/wheel-cuda/check
	$(CUDA_VENV)/bin/python -m zipfile -e dist/fop_kernels-*+cu*-*.whl build/wheel-cuda/check
	readelf -d build/wheel-cuda/check/fop_kernels/_C*.so | grep NEEDED
	readelf -d build/wheel-cuda/check/fop_kernels/_C*.so | grep -q 'libc10_cuda.so'
	readelf -d build/wheel-cuda/check/fop_kernels/_C*.so | grep -q 'libcusolver.so'
	$(CUDA_VENV)/bin/python -c "import glob, torch; \
		torch.ops.load_library(glob.glob('build/wheel-cuda/check/fop_kernels/_C*.so')[0]); \
		dump = torch._C._dispatch_dump('fop_kernels::eigh'); print(dump); \
		assert 'CUDA: registered' in dump and 'CPU: registered' in dump, 'no CUDA kernel registered'"
	ls dist/fop_kernels-*+cu*-*.whl

cmake-test: install
	cmake -S . -B cmake-build -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(VPY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
		-DPython_EXECUTABLE=$(abspath $(VPY))
	cmake --build cmake-build -j2
	ctest --test-dir cmake-build --output-on-failure
