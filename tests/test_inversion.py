"""Exact transporter inversion by Jacobi and Gauss-Seidel-Jacobi fixed-point decoding.

Every expectation is computed against sequential decoding (``method="sequential"``, the KV-cache
path that tests/test_model.py checks against the forward pass), or against the forward pass itself:

1. On the trained tiny model (float32, default tol): Jacobi (G = 1) and GS-Jacobi (G = 2, 4)
   agree with sequential decoding within 1e-4 max abs, on u from the model's own sampler and on
   real digits sent through the forward process and f_T. The report's pass counts lie in
   (0, max_iters], its residuals reach tol, and the trained model needs far fewer than N passes.
2. For any weights (heavily perturbed random ones), tol = 0 and max_iters = N give sequential
   decoding within 1e-5 (float32) and 1e-10 (float64) for every G; far fewer passes do not (so the
   check is not passing only because the iteration happens to converge fast).
3. One Jacobi pass: the exact inverse is its fixed point, and it runs on any prefix of the tokens.
4. Per-block settings reach the block they name (index as in ``Transporter.blocks``).
5. At t = 1 the transporter is the identity, and Jacobi returns u exactly after one pass.
6. Bad settings raise a one-line ``ConfigError``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ntm_edge import NTM
from ntm_edge.config import TransporterConfig
from ntm_edge.data import load_dataset
from ntm_edge.decoding import DEFAULT_TOL, segment_bounds
from ntm_edge.errors import ConfigError
from ntm_edge.numerics import dequantize
from ntm_edge.transporter import Transporter

STEPS = 4


@pytest.fixture(scope="module")
def tiny(trained_tiny) -> NTM:
    return NTM.from_pretrained(trained_tiny[0]).eval()


def perturbed_transporter(seed: int = 0, dtype=torch.float32) -> Transporter:
    """2 blocks over 8x8 images in 2x2 patches (N = 16 tokens, D = 4), every parameter plus
    N(0, 0.1^2): the zero-initialised output projections move off the identity (pixels move O(1-10))."""
    torch.manual_seed(seed)
    cfg = TransporterConfig(patch_size=2, num_blocks=2, layers_per_block=1, width=16, heads=2)
    tr = Transporter(cfg, channels=1, image_size=8).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(dtype) * 0.1)
    return tr.eval()


def sampled_u(model: NTM, n: int = 16):
    """u_t0 (n, C, H, W) from the model's own sampler, and t0."""
    ids, mask = model.tokenize([str(i % 10) for i in range(n)])
    return model.sample_u(ids, mask, STEPS, np.random.default_rng(0), 0.0, 0.025)


def real_u(model: NTM, n: int = 16):
    """Held-out digits through the forward process to level t0, then f_T: (u, x_t0, t0)."""
    data = load_dataset("digits", "test", image_size=model.config.image_size)
    x0 = dequantize(torch.from_numpy(data.images[:n]), torch.Generator().manual_seed(1))
    traj = model.forward_trajectory(x0, STEPS, generator=torch.Generator().manual_seed(2))
    x_t0, t0 = traj.x[:, 0], traj.t[:, 0]
    with torch.no_grad():
        return model.transporter(x_t0, t0, STEPS)[0], x_t0, t0


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# 1. the trained model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("segments", [1, 2, 4], ids=["jacobi", "gs2", "gs4"])
def test_jacobi_matches_sequential_on_trained_model(tiny, segments):
    tr = tiny.transporter
    N = tr.num_tokens
    u_sampled, t_sampled = sampled_u(tiny)
    u_real, x_real, t_real = real_u(tiny)
    with torch.no_grad():
        for name, u, t in [("sampler", u_sampled, t_sampled), ("real data", u_real, t_real)]:
            seq = tr.inverse(u, t, STEPS)
            assert max_abs(seq, u) > 0.05, f"{name}: the trained transporter is still the identity"
            x, report = tr.inverse_with_report(u, t, STEPS, method="jacobi", segments=segments)
            err = max_abs(x, seq)
            assert err < 1e-4, f"{name}, G={segments}: Jacobi differs from sequential by {err:.2e}"
            assert x.shape == u.shape and x.dtype == torch.float32
            assert report.method == "jacobi" and report.all_converged, report
            for i, (its, res) in enumerate(zip(report.iterations, report.residuals, strict=True)):
                bounds = segment_bounds(N, segments)
                assert len(its) == len(res) == segments, f"block {i}: one entry per segment"
                for g, ((start, end), k, r) in enumerate(zip(bounds, its, res, strict=True)):
                    assert 0 < k <= end - start, f"block {i} segment {g}: {k} passes for {end - start} tokens"
                    assert r <= DEFAULT_TOL or k == end - start - (start == 0), f"block {i} segment {g}: {r:.2e}"
            if segments == 1:  # the point of Jacobi: the trained map converges in far fewer than N passes
                assert max(report.block_iterations) <= N // 2, report
        # and it inverts the forward pass of real data
        x = tr.inverse(u_real, t_real, STEPS, method="jacobi", segments=segments)
        assert max_abs(x, x_real) < 1e-4


def test_sequential_stays_the_default_and_reports_n_minus_1(tiny):
    tr = tiny.transporter
    u, t0 = sampled_u(tiny, 4)
    with torch.no_grad():
        x, report = tr.inverse_with_report(u, t0, STEPS)
        assert torch.equal(x, tr.inverse(u, t0, STEPS)) and torch.equal(x, tr.inverse(u, t0, STEPS, "sequential"))
    assert report.method == "sequential"
    assert report.iterations == ((tr.num_tokens - 1,),) * len(tr.blocks) and report.all_converged


# ---------------------------------------------------------------------------------------------
# 2. exact after N passes for any weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
def test_n_passes_are_exact_for_any_weights(dtype, atol):
    tr = perturbed_transporter(dtype=dtype)
    N = tr.num_tokens
    u = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)).to(dtype)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9])
    with torch.no_grad():
        seq = tr.inverse(u, t, STEPS)
        assert max_abs(tr(seq, t, STEPS)[0], u) < 10 * atol, "sequential decoding is not the inverse"
        for segments in (1, 2, 3, N):
            x, report = tr.inverse_with_report(u, t, STEPS, method="jacobi", segments=segments, tol=0.0, max_iters=N)
            err = max_abs(x, seq)
            assert err < atol, f"G={segments}, max_iters=N: {err:.2e} from sequential"
            assert report.all_converged and all(k <= N for its in report.iterations for k in its)
        # the check has teeth: on these weights a few passes are far from the inverse
        x, report = tr.inverse_with_report(u, t, STEPS, method="jacobi", tol=0.0, max_iters=3)
        assert max_abs(x, seq) > 1e-2 and not report.all_converged, report


# ---------------------------------------------------------------------------------------------
# 3. one Jacobi pass
# ---------------------------------------------------------------------------------------------


def test_jacobi_step_has_the_inverse_as_fixed_point_on_every_prefix():
    tr = perturbed_transporter(dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    N, D = tr.num_tokens, 4
    u = torch.randn(2, N, D, generator=g, dtype=torch.float64)
    c = torch.randn(2, tr.cfg.width, generator=g, dtype=torch.float64)
    gate = torch.ones(2, 1, 1, dtype=torch.float64)
    with torch.no_grad():
        for block in tr.blocks:
            xs, us = block.scan_order(block.inverse(u, c, gate)), block.scan_order(u)  # scan order
            for n in (1, 5, N):
                step = block.jacobi_step(xs[:, :n], us[:, :n], c, gate)
                assert step.shape == (2, n, D)
                assert max_abs(step, xs[:, :n]) < 1e-10, f"flip={block.flip}, prefix {n}: not a fixed point"
            # from the guess x = u, one pass makes token 1 exact and leaves token 0 alone
            step = block.jacobi_step(us, us, c, gate)
            assert torch.equal(step[:, 0], us[:, 0]) and max_abs(step[:, 1], xs[:, 1]) < 1e-12
            assert max_abs(step, xs) > 1e-2


# ---------------------------------------------------------------------------------------------
# 4. per-block settings
# ---------------------------------------------------------------------------------------------


def test_per_block_settings_reach_their_block(tiny):
    tr = tiny.transporter
    N = tr.num_tokens
    u, t0 = sampled_u(tiny, 8)
    with torch.no_grad():
        # block 1 (inverted first) gets one pass, block 0 up to N
        _, report = tr.inverse_with_report(u, t0, STEPS, method="jacobi", max_iters=(N, 1))
        assert report.iterations[1] == (1,) and report.residuals[1][0] > 1e-2, report
        assert not all(report.converged[1])
        assert 1 < report.iterations[0][0] < N - 1 and report.residuals[0][0] <= DEFAULT_TOL, report
        assert all(report.converged[0])

        _, report = tr.inverse_with_report(u, t0, STEPS, method="jacobi", segments=(1, 4), tol=(1e-3, 0.0))
        assert len(report.iterations[0]) == 1 and len(report.iterations[1]) == 4, report
        assert report.residuals[0][0] <= 1e-3
        # tol = 0: every segment of block 1 runs to its exact bound, or stops at a pass that changed nothing
        for (start, end), k, r in zip(segment_bounds(N, 4), report.iterations[1], report.residuals[1], strict=True):
            assert k == end - start - (start == 0) or (0 < k < end - start and r == 0.0), report


# ---------------------------------------------------------------------------------------------
# 5. identity at t = 1
# ---------------------------------------------------------------------------------------------


def test_jacobi_is_exactly_the_identity_at_t1():
    tr = perturbed_transporter()
    u = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x, report = tr.inverse_with_report(u, 1.0, STEPS, method="jacobi", segments=2)
        assert torch.equal(x, u)
        assert report.iterations == ((1, 1), (1, 1)) and report.block_residuals == (0.0, 0.0)
        # per example: only the t = 1 example passes through untouched
        t = torch.tensor([0.5, 1.0, 0.2])
        x = tr.inverse(u, t, STEPS, method="jacobi", tol=0.0)
        assert torch.equal(x[1], u[1]) and max_abs(x, tr.inverse(u, t, STEPS)) < 1e-5


# ---------------------------------------------------------------------------------------------
# 6. bad settings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, words",
    [
        (dict(method="newton"), ["newton", "sequential", "jacobi"]),
        (dict(method="jacobi", segments=0), ["segments", "16"]),
        (dict(method="jacobi", segments=17), ["segments", "16"]),
        (dict(method="jacobi", segments=2.0), ["segments"]),
        (dict(method="jacobi", max_iters=0), ["max_iters"]),
        (dict(method="jacobi", max_iters=(4, 0)), ["max_iters"]),
        (dict(method="jacobi", tol=-1e-3), ["tol"]),
        (dict(method="jacobi", tol=float("nan")), ["tol"]),
        (dict(method="jacobi", segments=(1, 2, 3)), ["segments", "3", "2 blocks"]),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bad_settings_raise_one_line_config_error(settings, words):
    tr = perturbed_transporter()  # 16 tokens, 2 blocks
    with pytest.raises(ConfigError) as info:
        tr.inverse(torch.zeros(1, 1, 8, 8), 0.5, STEPS, **settings)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"
