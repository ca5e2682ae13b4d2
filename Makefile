# The two commands: `make demo` (the main job) and `make test`. Each creates .venv when missing
# and installs requirements.lock into it.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# One OpenMP thread per process: on a busy 2-core machine more threads made steps 10-17x slower.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: install lock test demo lab lab-copies reproduce figures bench gpu-check clean-runs

install: $(STAMP)

# Every extra (study, prepare, dev) at the exact versions of requirements.lock, then mlcl itself.
$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || \
		{ echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Re-resolve requirements.lock from pyproject.toml (newest versions), with pip-tools in a
# throwaway virtualenv; then `make install` installs it.
LOCK_VENV := $(VENV)-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet pip-tools
	$(LOCK_VENV)/bin/pip-compile --quiet --upgrade --strip-extras --extra study --extra prepare \
		--extra dev --no-emit-index-url --no-emit-find-links -o requirements.lock pyproject.toml
	rm -rf $(LOCK_VENV)

# The suite in TEST_WORKERS processes (pytest-xdist), one OpenMP thread each.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

demo: $(STAMP)
	$(PY) -m mlcl demo

# JupyterLab on copies of notebooks/ in LAB_DIR (under the untracked runs/): what you run and
# save there leaves the tracked notebooks clean. A copy is made once and then kept (your
# edits); delete it for a fresh one. As root (containers) Jupyter needs --allow-root, added here.
LAB_DIR ?= runs/lab/notebooks
lab: $(STAMP) lab-copies
	$(VENV)/bin/jupyter lab $(LAB_DIR) $(if $(filter 0,$(shell id -u)),--allow-root)

lab-copies:
	@mkdir -p $(LAB_DIR)
	@for nb in notebooks/*.ipynb; do \
		copy=$(LAB_DIR)/$$(basename $$nb); \
		if [ ! -e $$copy ]; then cp $$nb $$copy && echo "copied $$nb to $$copy"; \
		elif [ $$nb -nt $$copy ]; then echo "kept $$copy: $$nb changed since (delete the copy for it)"; \
		fi; \
	done

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
