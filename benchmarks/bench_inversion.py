"""Exact transporter inversion: sequential vs Jacobi vs GS-Jacobi on the `small` preset, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/bench_inversion.py -q -s

The model: the checkpoint that NTM_SMALL_CHECKPOINT points to (a trained `small` run), else the
`small` preset with every transporter parameter perturbed by N(0, PERTURB^2) (a fresh transporter is
the identity, which any method inverts in one pass); the printed table says which. Inputs: u_t0
from the model's own 4-step sampler (a checkpoint trained on other grids alone: its trained step count
nearest 4), prompts 0-9 in turn. Every method inverts the same u; the
table gives each one's median time, its speed ratio against sequential decoding at the same batch,
the passes it used per block (inversion order: last block first) and its max abs difference from
sequential decoding. On CPU a batch-64 Jacobi pass is compute-bound (it redoes every token each
pass), so the launch-bound batch-1 case is where fixed-point decoding pays, as on GPUs.

A contextual transporter (``train --transporter-context``) is inverted at every step of its sampler;
what is timed is one such inversion, its last step's: u_t0 = f_T(x_t0; t0, T, x_t1) of the sampled
levels, given the same x_t1.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ntm_edge.checkpoint import load_info, trained_steps
from ntm_edge.config import get_preset
from ntm_edge.decoding import DEFAULT_TOL
from ntm_edge.errors import NtmError
from ntm_edge.model import NTM
from ntm_edge.schedule import scoring_step_count


def sampler_steps(path: str | None) -> int:
    """The sampler's steps T (the transporter is conditioned on it): 4, or for a checkpoint trained on other
    grids alone (`--pairwise-steps 3`) the trained count nearest 4."""
    return scoring_step_count(trained_steps(path), 4) if path else 4


PERTURB = 0.03  # std of the weight noise when no checkpoint is given
GS_SEGMENTS = 2
METHODS = {  # name -> Transporter.inverse settings (defaults otherwise: tol 1e-5, no cap but N)
    "sequential": dict(method="sequential"),
    "jacobi": dict(method="jacobi"),
    "gs-jacobi": dict(method="jacobi", segments=GS_SEGMENTS),
}
BATCHES = (1, 64)
ROUNDS = {1: 25, 64: 5}


@pytest.fixture(scope="module")
def model() -> tuple[NTM, str, int]:
    """(model, its description, the sampler's steps T). A bad NTM_SMALL_CHECKPOINT fails here, in one line."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = os.environ.get("NTM_SMALL_CHECKPOINT")
    if path:
        try:
            step = load_info(path).get("step")
            return NTM.from_pretrained(path).eval(), f"trained checkpoint {path} (step {step})", sampler_steps(path)
        except NtmError as e:
            pytest.fail(f"NTM_SMALL_CHECKPOINT: {e}", pytrace=False)
    torch.manual_seed(0)
    m = NTM(get_preset("small").with_data(1, tuple("0123456789"))).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.transporter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * PERTURB)
    return m, f"UNTRAINED small preset, transporter weights + N(0, {PERTURB}^2) (set NTM_SMALL_CHECKPOINT)", 4


@pytest.fixture(scope="module")
def inputs(model):
    """batch -> (u (B, C, H, W), t0, x from sequential decoding, the context x_t1 of a contextual model or None)."""
    m, _, steps = model
    out = {}
    for B in BATCHES:
        ids, mask = m.tokenize([str(i % 10) for i in range(B)])
        levels, ts = m.sample_levels(ids, mask, steps, np.random.default_rng(B), 0.0, m.config.t_min_sample)
        u, t0, context = levels[:, 0], float(ts[0]), None
        with torch.no_grad():
            if m.contextual:  # the levels are x: the last step's u_t0, given its x_t1
                context = levels[:, 1]
                u = m.transporter(levels[:, 0], t0, steps, context=context)[0]
            out[B] = u, t0, m.transporter.inverse(u, t0, steps, context=context), context
    return out


@pytest.fixture(scope="module")
def results(model, summary):
    """(method, batch) -> (median seconds, report, max abs diff); the table is built at teardown."""
    rows: dict = {}
    yield rows
    m, description, steps = model
    tr = m.transporter
    summary.append(f"transporter inversion, {description}, u from the {steps}-step sampler")
    summary.append(f"  {len(tr.blocks)} blocks x {tr.num_tokens} tokens, torch threads {torch.get_num_threads()}, "
                   f"tol {DEFAULT_TOL:g}, gs-jacobi segments {GS_SEGMENTS}; passes per block in inversion order")
    summary.append(f"  {'batch':>5}  {'method':<11} {'median ms':>10} {'vs seq':>7}  {'passes':<24} {'max abs diff':>12}")
    for B in BATCHES:
        seq = rows.get(("sequential", B))
        for name in METHODS:
            if (name, B) not in rows:
                continue
            median, report, err = rows[(name, B)]
            ratio = f"{seq[0] / median:.2f}x" if seq and median else "-"
            passes = " | ".join("+".join(map(str, its)) for its in reversed(report.iterations))
            if not report.all_converged:
                passes += " (capped)"
            time_ms = f"{median * 1e3:.2f}" if median else "-"
            summary.append(f"  {B:>5}  {name:<11} {time_ms:>10} {ratio:>7}  {passes:<24} {err:>12.2e}")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(METHODS))
def test_inversion(benchmark, model, inputs, results, name, batch):
    tr, steps = model[0].transporter, model[2]
    u, t0, reference, context = inputs[batch]
    settings = {**METHODS[name], "context": context}
    with torch.no_grad():
        x, report = tr.inverse_with_report(u, t0, steps, **settings)
    err = (x - reference).abs().max().item()

    def run():
        with torch.no_grad():
            return tr.inverse(u, t0, steps, **settings)

    benchmark.group = f"inversion, batch {batch}"
    benchmark.extra_info.update(passes=report.block_iterations, max_abs_diff=err)
    benchmark.pedantic(run, rounds=ROUNDS[batch], warmup_rounds=1)
    median = benchmark.stats.stats.median if benchmark.stats else None  # None under --benchmark-disable
    results[(name, batch)] = (median, report, err)
    assert err < 1e-3, f"{name} at batch {batch} is {err:.2e} from sequential decoding"
