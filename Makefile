# Every target sets up what it needs: `make demo` and `make test` work on a fresh machine with only Python.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1
STAMPS := .stamps
NATIVE_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h) setup.py pyproject.toml

.PHONY: install demo test lint bench wheel wheel-cuda cmake-test clean

install: $(STAMPS)/install

$(STAMPS)/venv:
	@mkdir -p $(STAMPS)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@touch $@

# torch only when it is not importable (a user's GPU machine keeps its own CUDA torch).
$(STAMPS)/deps: $(STAMPS)/venv
	$(VPY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(VPY) -c "import triton" 2>/dev/null || $(PIP) install $(TRITON_SPEC)
	$(PIP) install numpy ninja "setuptools>=69" wheel pytest pytest-benchmark hypothesis ruff \
		scikit-learn matplotlib tqdm scipy
	@touch $@

$(STAMPS)/install: $(STAMPS)/deps $(NATIVE_SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	@touch $@

# The time-to-accuracy study on sklearn's bundled digits with the small CNN, every available optimizer:
# writes out/demo/table.md, results.json and accuracy.png (a few minutes on 2 CPU cores).
demo: install
	$(VPY) -m fop_kernels
	$(VPY) -m fop.train --data digits --model cnn --batch-sizes 1024,full --seeds 0,1,2 --epochs 60 \
		--target 95 --out out/demo

test: install
	$(VPY) -m pytest -q tests

lint: install
	$(VPY) -m ruff check fop_kernels python tests bench

bench: install
	$(VPY) -m pytest bench --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,rounds \
		--benchmark-json=bench/last_run.json -s

clean:
	rm -rf build dist *.egg-info $(STAMPS) fop_kernels/_C*.so
