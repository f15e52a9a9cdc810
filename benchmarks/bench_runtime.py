"""The torch-free runtime (numpy + onnxruntime) against the torch sampler, side by side, batch 1.

    NTM_SMALL_CHECKPOINT=runs/small OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/bench_runtime.py -q

Exports the checkpoint (NTM_SMALL_CHECKPOINT, else the untrained `small` preset) to a bundle in a
temporary directory, then times the same 4-step sampling + exit on both paths with the same seed
and thread count: images/s and the runtime's speed ratio over torch, per exit and guidance weight.
The images themselves agree within one uint8 level (tests/test_runtime.py checks it).
"""

from __future__ import annotations

import os

import pytest
import torch

from ntm_edge.config import get_preset
from ntm_edge.exits import sample_images
from ntm_edge.export.writer import export_bundle
from ntm_edge.model import NTM
from ntm_edge.runtime.sampler import generate
from ntm_edge.runtime.session import open_runtime

CASES = {  # name -> (inverse method, guidance)
    "jacobi w=0": ("jacobi", 0.0),
    "jacobi w=1": ("jacobi", 1.0),
    "sequential w=0": ("sequential", 0.0),
}
ROUNDS = 20


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    ckpt = os.environ.get("NTM_SMALL_CHECKPOINT")
    if not ckpt:
        ckpt = tmp_path_factory.mktemp("ckpt") / "small"
        NTM(get_preset("small").with_data(1, tuple("0123456789"))).save_pretrained(ckpt)
    bundle = tmp_path_factory.mktemp("bundle") / "small"
    export_bundle(ckpt, bundle, log=lambda *_: None)
    return NTM.from_pretrained(ckpt), open_runtime(bundle, "cpu", threads), ckpt, threads


@pytest.fixture(scope="module")
def results(paths, summary):
    rows: dict = {}
    yield rows
    summary.append(f"runtime (onnxruntime) vs torch sampler, batch 1, {paths[2]}, {paths[3]} thread(s)")
    summary.append(f"  {'case':<16} {'torch ms':>9} {'runtime ms':>11} {'speed-up':>9}")
    for case in CASES:
        if (case, "torch") in rows and (case, "runtime") in rows:
            t, r = rows[(case, "torch")], rows[(case, "runtime")]
            summary.append(f"  {case:<16} {t * 1e3:>9.1f} {r * 1e3:>11.1f} {t / r:>8.2f}x")


@pytest.mark.parametrize("path", ["torch", "runtime"])
@pytest.mark.parametrize("case", list(CASES))
def test_sampler(benchmark, paths, results, case, path):
    model, rt, _, _ = paths
    method, w = CASES[case]
    if path == "torch":
        def run():
            return sample_images(model, ["7"], seed=0, guidance=w, final="inverse", inverse_method=method)
    else:
        def run():
            return generate(rt, ["7"], seed=0, guidance=w, final="inverse", inverse_method=method).images
    benchmark.group = f"sampler, {case}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2)
    if benchmark.stats:
        results[(case, path)] = benchmark.stats.stats.median
