# Two commands set everything up on a fresh machine:
#   make demo   draw a few prompts with the shipped default model (demo.png) and print the latency table
#   make test   run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is installed first, pinned, so that resolving the project's `torch>=2.4` never pulls another
# build. Which build `torch==2.13.0` is depends on pip's configuration: this project's CI machines
# resolve it to a CPU wheel; plain PyPI on Linux gives the CUDA build. TORCH_INDEX picks explicitly:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu      # CPU only (small download)
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cu128    # NVIDIA GPUs
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: venv install demo test lint typecheck clean bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The default model shipped in the package (ntm_edge/assets/default) on the torch-free runtime: three
# prompts, one labelled grid (demo.png), the per-stage latency table. The first run assembles the full
# bundle in $NTM_EDGE_CACHE (default ~/.cache/ntm-edge); later runs reuse it. One thread per graph:
# on a 2-core machine more threads only oversubscribe it. Guidance 1: the setting the model card measures
# (prompt accuracy 1.000 at 4 steps with the denoiser exit; 0.968 at guidance 0).
DEMO_ARGS ?=
demo: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m ntm_edge.runtime.demo --out demo.png --guidance 1 $(DEMO_ARGS)

# Two workers, one per core of the project's 2-core machines, each taking whole modules (TEST_WORKERS=0:
# one process). tests/conftest.py builds the session's trained models once for both.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

lint: install
	$(VENV)/bin/ruff check .

# mypy over the package as installed (export/, runtime/, calib/ as ntm_edge.export, .runtime, .calib),
# the tests and the benchmarks; settings in pyproject.toml [tool.mypy]. CI runs it (.ci/run).
typecheck: install
	$(PY) .ci/typecheck.py

clean:
	rm -rf $(VENV) runs demo.png .pytest_cache .typecheck .mypy_cache

# The latency suites (pytest-benchmark; not part of `make test`). NTM_SMALL_CHECKPOINT=runs/small times a
# trained model, else the untrained `small` preset. `ntm-edge bench --out DIR` runs bench_stages.py and
# writes a report (report.md, report.png).
bench: install
	$(PY) -m pytest benchmarks -q
