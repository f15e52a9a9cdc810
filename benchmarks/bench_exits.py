"""The ways out of u-space, end to end (4 sampler steps + exit), side by side on one model.

    NTM_SMALL_CHECKPOINT=runs/small OMP_NUM_THREADS=2 .venv/bin/python -m pytest benchmarks/bench_exits.py -q

Exits: `inverse` (sequential decoding), `inverse-jacobi` (exact fixed-point decoding),
`inverse+score` (trajectory score denoising, paper 3.5) and `denoiser` (g_phi, paper 3.9; needs
`ntm-edge train-denoiser` on the checkpoint). Reported: milliseconds per image at batch 1, images/s
at batch 64, and each exit's speed ratio against `inverse+score` (the paper: the denoiser is ~9x
faster at equal quality; quality is `ntm-edge eval --final ...`). Without NTM_SMALL_CHECKPOINT the
untrained `small` preset is timed (speed does not depend on the weights, except Jacobi's passes).
"""

from __future__ import annotations

import os

import pytest
import torch

from ntm_edge.config import get_preset
from ntm_edge.denoiser import has_denoiser, load_denoiser
from ntm_edge.exits import sample_images
from ntm_edge.model import NTM

EXITS = {  # name -> sample_images settings
    "inverse": dict(final="inverse"),
    "inverse-jacobi": dict(final="inverse", inverse_method="jacobi"),
    "inverse+score": dict(final="inverse+score"),
    "denoiser": dict(final="denoiser"),
}
BATCHES = (1, 64)
ROUNDS = {1: 10, 64: 3}


@pytest.fixture(scope="module")
def setup():
    path = os.environ.get("NTM_SMALL_CHECKPOINT")
    if path:
        model = NTM.from_pretrained(path)
        den = load_denoiser(path) if has_denoiser(path) else None
        return model, den, f"checkpoint {path}"
    return NTM(get_preset("small").with_data(1, tuple("0123456789"))).eval(), None, "UNTRAINED small preset"


@pytest.fixture(scope="module")
def results(setup, summary):
    rows: dict = {}
    yield rows
    summary.append(f"exits from u-space (4 steps + exit), {setup[2]}, torch threads {torch.get_num_threads()}")
    summary.append(f"  {'exit':<15} {'ms/image @1':>12} {'images/s @64':>13} {'vs inverse+score @1':>20} {'@64':>7}")
    ref = {B: rows.get(("inverse+score", B)) for B in BATCHES}
    for name in EXITS:
        if (name, 1) not in rows:
            continue
        t1, t64 = rows[(name, 1)], rows.get((name, 64))
        r1 = f"{ref[1] / t1:.2f}x" if ref[1] else "-"
        r64 = f"{ref[64] / t64:.2f}x" if ref[64] and t64 else "-"
        ips = f"{64 / t64:.1f}" if t64 else "-"
        summary.append(f"  {name:<15} {t1 * 1e3:>12.1f} {ips:>13} {r1:>20} {r64:>7}")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(EXITS))
def test_exit(benchmark, setup, results, name, batch):
    model, den, _ = setup
    if name == "denoiser" and den is None:
        pytest.skip("the checkpoint has no denoiser (ntm-edge train-denoiser)")
    prompts = [str(i % 10) for i in range(batch)]
    benchmark.group = f"exits, batch {batch}"
    benchmark.pedantic(lambda: sample_images(model, prompts, seed=0, denoiser=den, **EXITS[name]),
                       rounds=ROUNDS[batch], warmup_rounds=1)
    if benchmark.stats:
        results[(name, batch)] = benchmark.stats.stats.median
