"""The one definition of each piece of plain arithmetic, against independent references.

``ntm_edge.numerics`` (formulas), ``ntm_edge.sampling`` (Algorithm 2's loop) and ``ntm_edge.decoding``
(the two exact inversions of an autoregressive block) take numpy arrays and torch tensors alike;
each is checked against a reference computed here another way, on both namespaces where it applies:

1. gaussian_nll: scipy.stats.norm.logpdf.
2. guided_gaussian (paper C.5): where sigma_c < sigma_u, the normalised density p_c^(1+w) / p_u^w by
   quadrature on a fine grid (its mean and standard deviation); elsewhere the closed form of mean
   extrapolation at the conditional scale; w = 0 is the conditional Gaussian exactly.
3. to_uint8: brute force, the nearest of the 256 levels; dequantize: every value lies in its pixel's
   bin, and the positions inside the bins are uniform (Monte Carlo); layouts.
4. relative_change: Python loops. x0_from_velocity and decoder_mean: the straight path (2.1).
5. reverse_levels (Algorithm 2) with the exact Gaussian reverse step of Gaussian data: the sampled
   levels have the forward process's marginal variances and lag-one covariances (Monte Carlo), and
   the noise is consumed in the documented order.
6. decode_tokens and solve_segments on an explicit autoregressive affine map written here: both
   return the x that the map was applied to (sequential exactly; (GS-)Jacobi for every G within the
   bound of passes, and with a tolerance, stopping by it).

Tolerances: float64 formulas 1e-12 relative (a few roundings); quadrature 1e-6 (a 200k-point grid
over +-12 sigma); Monte Carlo 5 standard errors (N = 200k; a false alarm below 1e-4 per check).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ntm_edge import schedule
from ntm_edge.decoding import decode_tokens, segment_bounds, solve_segments
from ntm_edge.numerics import dequantize, gaussian_nll, guided_gaussian, relative_change, to_uint8
from ntm_edge.sampling import draw_noise, reverse_levels

BOTH = [pytest.param(np.asarray, id="numpy"), pytest.param(torch.from_numpy, id="torch")]


def as_np(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ---------------------------------------------------------------------------------------------
# 1. Gaussian NLL
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("xp", BOTH)
def test_gaussian_nll_is_the_normal_log_density(xp):
    rng = np.random.default_rng(0)
    x, mu, log_sigma = rng.standard_normal((3, 4, 2, 5))
    got = as_np(gaussian_nll(xp(x), xp(mu), xp(log_sigma)))
    expected = -norm.logpdf(x, loc=mu, scale=np.exp(log_sigma)).reshape(4, -1).sum(1)
    assert got.shape == (4,)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_gaussian_nll_upcasts_half_precision():
    """An fp32 island: fp16 inputs are scored in float32 (not in fp16, whose exp and sums lose digits)."""
    rng = np.random.default_rng(1)
    x, mu, ls = (torch.from_numpy(v).half() for v in rng.standard_normal((3, 2, 300)))
    got = gaussian_nll(x, mu, ls)
    assert got.dtype == torch.float32
    expected = -norm.logpdf(x.double().numpy(), mu.double().numpy(), np.exp(ls.double().numpy())).sum(1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# 2. classifier-free guidance on a Gaussian (C.5)
# ---------------------------------------------------------------------------------------------


def powered_product_moments(mu_c, s_c, mu_u, s_u, w):
    """Mean and std of p_c^(1+w) / p_u^w, normalised numerically on a grid (sigma_c < sigma_u)."""
    x = np.linspace(mu_c - 12 * s_c, mu_c + 12 * s_c, 200_001)
    log_p = (1 + w) * norm.logpdf(x, mu_c, s_c) - w * norm.logpdf(x, mu_u, s_u)
    p = np.exp(log_p - log_p.max())
    p /= np.trapezoid(p, x)
    mean = np.trapezoid(x * p, x)
    return mean, np.sqrt(np.trapezoid((x - mean) ** 2 * p, x))


@pytest.mark.parametrize("xp", BOTH)
@pytest.mark.parametrize("w", [0.5, 1.0, 3.0])
def test_guidance_is_the_powered_product_where_it_exists(xp, w):
    rng = np.random.default_rng(2)
    mu_c, mu_u = rng.normal(0, 0.5, (2, 6))
    ls_u = rng.normal(0, 0.3, 6)
    ls_c = ls_u - rng.uniform(0.05, 1.0, 6)  # sigma_c < sigma_u: the product is a normalisable Gaussian
    mu, ls = (as_np(v) for v in guided_gaussian(*(xp(v) for v in (mu_c, ls_c, mu_u, ls_u)), w))
    for i in range(6):
        m, s = powered_product_moments(mu_c[i], np.exp(ls_c[i]), mu_u[i], np.exp(ls_u[i]), w)
        assert abs(mu[i] - m) < 1e-6 * max(1.0, abs(m)) and abs(np.exp(ls[i]) - s) < 1e-6 * s, (i, mu[i], m, s)


@pytest.mark.parametrize("xp", BOTH)
def test_guidance_extrapolates_the_mean_where_sigma_c_is_larger(xp):
    """sigma_c >= sigma_u: r = 1, the mean (1 + w) mu_c - w mu_u at the conditional scale; w = 0: the
    conditional Gaussian exactly."""
    rng = np.random.default_rng(3)
    mu_c, mu_u, ls_u = rng.normal(0, 1, (3, 8))
    ls_c = ls_u + rng.uniform(0.0, 1.0, 8)
    args = [xp(v) for v in (mu_c, ls_c, mu_u, ls_u)]
    mu, ls = (as_np(v) for v in guided_gaussian(*args, 2.0))
    np.testing.assert_allclose(mu, 3.0 * mu_c - 2.0 * mu_u, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ls, ls_c, rtol=1e-12, atol=1e-12)
    mu, ls = (as_np(v) for v in guided_gaussian(*args, 0.0))
    assert np.array_equal(mu, mu_c) and np.array_equal(ls, ls_c)


# ---------------------------------------------------------------------------------------------
# 3. pixels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("xp", BOTH)
def test_to_uint8_is_the_nearest_level(xp):
    rng = np.random.default_rng(4)
    x = rng.uniform(-1.3, 1.3, (3, 2, 4, 5)).astype(np.float32)  # (B, C, H, W), some out of range
    got = to_uint8(xp(x))
    assert got.dtype == np.uint8 and got.shape == (3, 4, 5, 2)  # (B, H, W, C)
    levels = np.arange(256) / 127.5 - 1.0  # the value each uint8 level stands for
    nearest = np.abs(np.clip(x, -1, 1)[..., None] - levels).argmin(-1)  # brute force over all 256
    assert np.array_equal(got, nearest.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("make", [
    pytest.param(lambda img: (np.asarray(img), np.random.default_rng(5)), id="numpy"),
    pytest.param(lambda img: (torch.from_numpy(img), torch.Generator().manual_seed(5)), id="torch"),
])
def test_dequantize_fills_each_pixel_bin_uniformly(make):
    pixels = np.random.default_rng(6).integers(0, 256, (50, 20, 20, 1), dtype=np.uint8)  # (B, H, W, C)
    x = as_np(dequantize(*make(pixels))).astype(np.float64)  # (B, C, H, W)
    assert x.shape == (50, 1, 20, 20)
    pos = (x + 1.0) * 128.0 - pixels.transpose(0, 3, 1, 2)  # position inside the pixel's bin
    assert pos.min() >= 0.0 and pos.max() < 1.0 + 1e-4  # float32 rounding at the top of a bin (torch)
    n = pos.size
    assert abs(pos.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n) and abs(pos.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / n)


# ---------------------------------------------------------------------------------------------
# 4. small formulas
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("xp", BOTH)
def test_relative_change_by_loops(xp):
    rng = np.random.default_rng(7)
    new, old = rng.standard_normal((2, 3, 4, 5))
    worst = 0.0
    for b in range(3):
        num = max(abs(a - o) for a, o in zip(new[b].ravel(), old[b].ravel(), strict=True))
        worst = max(worst, num / (max(abs(a) for a in new[b].ravel()) + 1e-12))
    assert abs(relative_change(xp(new), xp(old)) - worst) < 1e-12 * worst


@pytest.mark.parametrize("xp", BOTH)
def test_velocity_and_decoder_mean_invert_the_straight_path(xp):
    rng = np.random.default_rng(8)
    x0, eps = rng.standard_normal((2, 5, 3))
    t = rng.uniform(0.01, 0.99, (5, 1))
    x_t = (1 - t) * x0 + t * eps  # (2.1)
    got = as_np(schedule.x0_from_velocity(xp(x_t), xp(t), xp(eps - x0)))
    np.testing.assert_allclose(got, x0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(as_np(schedule.decoder_mean(xp((1 - t) * x0), xp(t))), x0, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# 5. Algorithm 2's loop
# ---------------------------------------------------------------------------------------------


def test_reverse_levels_with_the_exact_reverse_step_keeps_the_forward_marginals():
    """Data x0 ~ N(0, s0^2): the true reverse step q(x_s | x_t) is Gaussian, N(A x_t + B m, C^2 + B^2 v)
    with m, v the posterior mean and variance of x0 given x_t. Run through the loop, it must draw
    levels with the forward process's Var x_t = (1 - t)^2 s0^2 + t^2 and
    Cov(x_s, x_t) = (1 - s)(1 - t) s0^2 + s^2 (1 - t) / (1 - s)."""
    s0, n, steps = 0.5, 200_000, 4
    ts = schedule.time_grid(steps, 0.025, 0.3)

    def predict(u_t, t, s):
        var_t = (1 - t) ** 2 * s0**2 + t**2
        m, v = (1 - t) * s0**2 / var_t * u_t, s0**2 * t**2 / var_t  # x0 | x_t
        A, B, C = schedule.posterior_coeffs(s, t)
        return A * u_t + B * m, np.full_like(u_t, 0.5 * np.log(C**2 + B**2 * v))

    noise = [z.astype(np.float64) for z in draw_noise(np.random.default_rng(9), n, (1,), steps)]
    u = reverse_levels(predict, noise, ts)[:, :, 0]  # (n, K)
    assert u.shape == (n, steps + 1) and np.array_equal(u[:, -1], noise[0][:, 0])
    for k, t in enumerate(ts):
        var = (1 - t) ** 2 * s0**2 + t**2
        assert abs(u[:, k].var() - var) < 5 * var * np.sqrt(2 / n), (k, u[:, k].var(), var)
    for k in range(steps):
        s, t = ts[k], ts[k + 1]
        cov = (1 - s) * (1 - t) * s0**2 + s**2 * (1 - t) / (1 - s)
        sd = np.sqrt(((1 - s) ** 2 * s0**2 + s**2) * ((1 - t) ** 2 * s0**2 + t**2) + cov**2)
        assert abs(np.mean(u[:, k] * u[:, k + 1]) - cov) < 5 * sd / np.sqrt(n), (k, cov)


def test_temperature_scales_the_draws_and_one_leaves_them_untouched():
    base = draw_noise(np.random.default_rng(11), 3, (1, 4, 4), 4)
    same = draw_noise(np.random.default_rng(11), 3, (1, 4, 4), 4, temperature=1.0)
    cold = draw_noise(np.random.default_rng(11), 3, (1, 4, 4), 4, temperature=0.7)
    assert all(np.array_equal(a, b) for a, b in zip(base, same, strict=True))
    assert all(c.dtype == np.float32 and np.array_equal(c, np.float32(0.7) * a) for a, c in zip(base, cold, strict=True))


@pytest.mark.parametrize("tau", [0.0, 0.6, 1.3])
def test_temperature_scales_a_linear_gaussian_chain_exactly(tau):
    """Zero-mean Gaussian data: the exact reverse step's mean is linear in u_t, so every level is linear
    in the noise, and at temperature tau the whole trajectory is tau times the tau = 1 one (tau = 0: the
    chain of means from u_T = 0, all zeros). The variance of each level is tau^2 times the forward one."""
    s0, steps = 0.5, 4
    ts = schedule.time_grid(steps, 0.025, 0.3)

    def predict(u_t, t, s):
        var_t = (1 - t) ** 2 * s0**2 + t**2
        m, v = (1 - t) * s0**2 / var_t * u_t, s0**2 * t**2 / var_t
        A, B, C = schedule.posterior_coeffs(s, t)
        return A * u_t + B * m, np.full_like(u_t, 0.5 * np.log(C**2 + B**2 * v))

    def levels(temperature):
        noise = draw_noise(np.random.default_rng(12), 50_000, (1,), steps, temperature)
        return reverse_levels(predict, [z.astype(np.float64) for z in noise], ts)[:, :, 0]

    hot, cold = levels(1.0), levels(tau)
    assert np.allclose(cold, tau * hot, rtol=1e-6, atol=1e-6)
    for k, t in enumerate(ts):
        var = (1 - t) ** 2 * s0**2 + t**2
        assert abs(cold[:, k].var() - tau**2 * var) <= 5 * tau**2 * var * np.sqrt(2 / 50_000) + 1e-12


def test_reverse_levels_consumes_the_noise_in_draw_order():
    """With mu = 0 and sigma = 1 each level is its own noise draw: u_T = noise[0], and the step that
    draws level k - 1 (k = T .. 1) takes noise[T - k + 1]."""
    noise = draw_noise(np.random.default_rng(10), 2, (1, 3, 3), 4)
    u = reverse_levels(lambda u_t, t, s: (np.zeros_like(u_t), np.zeros_like(u_t)), noise, np.linspace(0.0, 1.0, 5))
    for level in range(5):
        assert np.array_equal(u[:, level], noise[4 - level])


# ---------------------------------------------------------------------------------------------
# 6. the inversion drivers on an explicit autoregressive map
# ---------------------------------------------------------------------------------------------


class ToyBlock:
    """u_n = (x_n - mu_n) exp(-alpha_n) with mu_n, alpha_n (D,) functions of x_<n only: sums of the
    earlier tokens through fixed random matrices, squashed (numpy float64)."""

    def __init__(self, N: int = 9, D: int = 3, seed: int = 11):
        rng = np.random.default_rng(seed)
        self.Wm, self.Wa = rng.normal(0, 0.6, (2, N, N, D, D))

    def params(self, xs: np.ndarray):
        """xs (B, n, D) -> mu, alpha (B, n, D), token k's from tokens < k (token 0: zeros)."""
        mu, alpha = np.zeros_like(xs), np.zeros_like(xs)
        for k in range(1, xs.shape[1]):
            mu[:, k] = np.tanh(np.einsum("bjd,jde->be", xs[:, :k], self.Wm[k, :k]))
            alpha[:, k] = 0.5 * np.tanh(np.einsum("bjd,jde->be", xs[:, :k], self.Wa[k, :k]))
        return mu, alpha

    def forward(self, x: np.ndarray) -> np.ndarray:
        mu, alpha = self.params(x)
        return (x - mu) * np.exp(-alpha)


@pytest.fixture(scope="module")
def toy():
    block = ToyBlock()
    x = np.random.default_rng(12).standard_normal((4, 9, 3))
    return block, x, block.forward(x)


def test_decode_tokens_inverts_the_map(toy):
    block, x, u = toy
    seen = []

    def step(x_n, n, caches):  # caches: the tokens so far, in a fixed-size buffer
        seen.append(n)
        caches = caches.copy()
        caches[:, n] = x_n
        mu, alpha = block.params(caches[:, : n + 2])
        return mu[:, n + 1], alpha[:, n + 1], caches

    got = decode_tokens(step, u, np.zeros_like(u))
    assert seen == list(range(8)) and np.abs(got - x).max() < 1e-12


@pytest.mark.parametrize("segments", [1, 2, 3, 9])
def test_solve_segments_inverts_the_map(toy, segments):
    block, x, u = toy

    def step(x_p, u_p):
        mu, alpha = block.params(x_p)
        return mu + np.exp(alpha) * u_p

    got, its, res, conv = solve_segments(step, u, segments, tol=0.0)  # run to the exact bound
    assert np.abs(got - x).max() < 1e-12 and all(conv)
    for (start, end), k in zip(segment_bounds(9, segments), its, strict=True):
        bound = end - start - (start == 0)  # token 0 needs no pass
        assert k <= bound and (k > 0 or bound == 0)
    got, its, res, conv = solve_segments(step, u, segments, tol=1e-9)  # stops at the tolerance or the bound
    assert np.abs(got - x).max() < 1e-6 and all(conv)
    for (start, end), k, r in zip(segment_bounds(9, segments), its, res, strict=True):
        assert r <= 1e-9 or k == end - start - (start == 0)
    got, its, res, conv = solve_segments(step, u, segments, tol=0.0, max_iters=1)
    assert segments == 9 or (np.abs(got - x).max() > 1e-3 and not all(conv))  # one pass is not enough
