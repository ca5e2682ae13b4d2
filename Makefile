# The two commands: `make demo` (the main job) and `make test`. Each creates .venv when missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# One OpenMP thread per process: on a busy 2-core machine more threads made steps 10-17x slower.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: install test demo lab reproduce figures bench gpu-check clean-runs

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The suite in TEST_WORKERS processes (pytest-xdist), one OpenMP thread each.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

demo: $(STAMP)
	$(PY) -m mlcl demo

# JupyterLab on notebooks/; as root (containers) Jupyter needs --allow-root, added here.
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

# make reproduce GRID=synthetic-study JOBS=2 ARGS="--executor cli data.root=data/synthetic"
GRID ?= synthetic-study
JOBS ?= 2
reproduce: $(STAMP)
	$(PY) -m mlcl reproduce --grid $(GRID) --jobs $(JOBS) $(ARGS)

# Rebuild the figures from a results registry alone: runs/registry -> figures/, or, when only
# the demo has run, runs/demo/registry -> figures/demo/ (it says which).
figures: $(STAMP)
	$(PY) -m mlcl figures

bench: $(STAMP)
	$(PY) -m mlcl measure --device cpu --out runs/bench/bench_cpu.json

# On a CUDA machine, < 8 min on one GPU: bench in fp32 and bf16, every paper preset rehearsed
# at its batch in bf16, 2 processes when there are 2 GPUs, MLCL vs UniMatch memory at the VOC
# preset -> runs/gpu-check/{gpu_check.json,SUMMARY.md} (docs/performance.md).
gpu-check: $(STAMP)
	$(PY) -m mlcl measure gpu-check --out runs/gpu-check

clean-runs:
	rm -rf runs/
