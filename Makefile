# Two commands for a fresh machine (see README.md):
#   make demo   set up everything, then run the demo (curate, train, generate a small learnable world; ~10 min on 2 cores)
#   make test   set up everything, then run the test suite (what CI runs)
# Other targets: make setup (environment + build), make build (rebuild the extension), make lint, make bench.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0: the CPU build on the project's machines; a CUDA machine gets the CUDA build from PyPI.
TORCH_SPEC ?= torch==2.13.0
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h kernels/*.cu kernels/*.cuh) setup.py

.PHONY: setup build test lint demo bench system-deps gpu-wheels

setup: $(VENV)/.deps-installed build system-deps

$(VENV)/.deps-installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -r requirements.txt
	# PySceneDetect (curation's cut-detection cross-check) without its GUI OpenCV dependency.
	$(BIN)/python -m pip install -q --no-deps scenedetect==0.7.2
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Rebuilds svd_fast/_C*.so when a C++/CUDA source changes (ninja recompiles only what changed).
build: $(VENV)/.deps-installed svd_fast/.ext-built
svd_fast/.ext-built: $(EXT_SOURCES) $(VENV)/.deps-installed
	$(BIN)/python setup.py -q build_ext --inplace
	touch $@

# Tesseract OCR (curation's text filter) comes from the system's package manager.
system-deps:
	@command -v tesseract >/dev/null || { \
	  echo "installing tesseract-ocr"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq tesseract-ocr; }

# Two pytest-xdist workers, one module each at a time (module fixtures are built once), one thread each: the
# suite's compilers, subprocesses and small-tensor cases leave a core idle when run one after another. Modules go
# out in collection order (tests/conftest.py puts those with `slow` cases first), not reordered by size.
TEST_WORKERS ?= 2
test: setup $(VENV)/.test-deps-installed
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

$(VENV)/.test-deps-installed: requirements-test.txt $(VENV)/.deps-installed
	$(BIN)/python -m pip install -q -r requirements-test.txt
	touch $@

lint: $(VENV)/.deps-installed
	$(BIN)/ruff check svd_fast tests bench

# The demo refuses a non-empty --out, so each `make demo` starts from a fresh demo_out/.
demo: setup
	rm -rf demo_out
	$(BIN)/svd-fast demo --out demo_out

bench: setup
	$(BIN)/python -m pytest bench -q -o python_files="bench_*.py" --benchmark-only --benchmark-json=bench/last_run.json

# Wheels the GPU machine's image lacks (it has torch, triton, numpy, transformers, pillow, ...), for
# bench/gpu_check.sh to install offline: diffusers only (a carried pillow would shadow the image's own).
# Run where PyPI is reachable; .whl/ then travels with the job (the device tool's carry list); at most 40 MiB.
GPU_WHEELS ?= diffusers==0.42.1 peft==0.21.0 accelerate==1.15.0
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	for spec in $(GPU_WHEELS); do \
	  $(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$$spec" || exit 1; \
	done
	@total=$$(du -cb .whl/*.whl | tail -1 | cut -f1); ls -l .whl; \
	  echo "total $$total bytes"; test $$total -lt 41943040 || { echo "over 40 MiB"; exit 1; }
