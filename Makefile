# Two commands set everything up on a fresh machine:
#   make demo   train/sample with the default model and write demo.png
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

# Until the embedded default model ships: train `tiny` on digits (about a minute), sample it with
# torch, then export it and sample it again on the torch-free runtime (same seed, same images).
demo: install
	rm -rf runs/demo runs/demo-bundle
	$(VENV)/bin/ntm-edge train --dataset digits --preset tiny --steps 300 --batch-size 64 --lr 2e-3 --out runs/demo --seed 0
	$(VENV)/bin/ntm-edge sample --checkpoint runs/demo --prompt 3 --num 16 --guidance 2 --out demo.png --seed 0
	$(VENV)/bin/ntm-edge export --checkpoint runs/demo --out runs/demo-bundle
	$(VENV)/bin/ntm-edge run --bundle runs/demo-bundle --prompt 3 --num 16 --guidance 2 --out demo-runtime.png --seed 0
	@echo "wrote demo.png (torch) and demo-runtime.png (onnxruntime, no torch)"

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

# mypy over the package as installed (export/, runtime/, calib/ as ntm_edge.export, .runtime, .calib),
# the tests and the benchmarks; settings in pyproject.toml [tool.mypy]. CI runs it (.ci/run).
typecheck: install
	$(PY) .ci/typecheck.py

clean:
	rm -rf $(VENV) runs demo.png demo-runtime.png .pytest_cache .typecheck .mypy_cache

# The latency suites (pytest-benchmark; not part of `make test`). NTM_SMALL_CHECKPOINT=runs/small times a
# trained model, else the untrained `small` preset. `ntm-edge bench --out DIR` runs bench_stages.py and
# writes a report (report.md, report.png).
bench: install
	$(PY) -m pytest benchmarks -q
