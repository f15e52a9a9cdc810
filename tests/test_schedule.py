"""Independent checks of ``ntm_edge/schedule.py`` (noise schedule of a Normalizing Trajectory Model).

What is checked, always against numbers produced here in a different way than the implementation:

1. The Markov chain (2.3) driven by ``forward_trajectory`` keeps the marginals (2.1):
   Monte Carlo mean ~ (1 - t) x0 and std ~ t at every level.
2. Posterior coefficients A, B, C (Prop. 2) against Gaussian conditioning of the 2x2 joint
   covariance of (x_s, x_t | x0), done in exact rational arithmetic (``fractions.Fraction``) via the
   Schur complement, plus a Monte Carlo regression of x_s on x_t.
3. Trajectory covariance S (Prop. 3) against a covariance propagated analytically through the
   Markov chain, and against the empirical covariance of ``forward_trajectory`` samples.
4. ``time_grid`` / ``time_grids`` / ``shift_time`` / ``shift_for_length`` shape and value rules.
5. The coefficient functions give the same numbers on float64 torch tensors as on numpy arrays.
6. Markov coefficients: b^2 == t^2 - a^2 s^2 (textbook form).
7. The bound offset (docs/design.md 4) against a Monte Carlo estimate of E_q[-log p(x0 | x_t0) + log q],
   and the 8-bit scale of bits_per_dim against two densities whose bits are known.

Tolerances.  Monte Carlo checks use Z_MAX = 5 standard errors, where the standard error is the
textbook large-N one for Gaussian data (mean: sigma/sqrt(N); std: sigma/sqrt(2N); covariance
entry: sqrt((S_jj S_kk + S_jk^2)/N); regression slope: sigma_res/(sqrt(N) sd(x_t)); residual
variance: sigma_res^2 sqrt(2/N)).  With a few dozen such checks per test, a 5-sigma band gives a
false-alarm probability below 1e-4 per test, and the seeds are fixed anyway.  Deterministic checks
against exact rational arithmetic use rtol ~ 1e-12 (a handful of float64 roundings); checks that
compare two float formulas with cancellation use an absolute tolerance scaled to the inputs.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from ntm_edge import schedule as sch

Z_MAX = 5.0  # Monte Carlo tolerance, in standard errors
N_MC = 200_000  # Monte Carlo sample count
X0 = np.array([-0.9, 0.15, 0.7])  # fixed clean data, distinct values in [-1, 1]


# ---------------------------------------------------------------------------------------------
# helpers (independent re-derivations)
# ---------------------------------------------------------------------------------------------


def draw(x0: np.ndarray, ts, n: int, seed: int) -> np.ndarray:
    """n forward trajectories of a fixed x0: returns (n, K, *x0.shape)."""
    x0b = np.broadcast_to(x0, (n,) + x0.shape)
    return sch.forward_trajectory(x0b, np.asarray(ts), np.random.default_rng(seed))


def exact_posterior(s: float, t: float) -> tuple[Fraction, Fraction, Fraction]:
    """(A, B, C^2) of q(x_s | x_t, x0) by Gaussian conditioning, in exact rationals.

    Joint of (x_s, x_t) given x0: means ((1-s) x0, (1-t) x0), Var x_s = s^2, Var x_t = t^2,
    Cov = a s^2 with a = (1-t)/(1-s) (Markov step).  Conditioning on x_t (Schur complement):
    E[x_s | x_t] = (1-s) x0 + (Cov/Var x_t)(x_t - (1-t) x0),  Var = Var x_s - Cov^2 / Var x_t.
    """
    fs, ft = Fraction(s), Fraction(t)
    a = (1 - ft) / (1 - fs)
    var_s, var_t, cov = fs * fs, ft * ft, a * fs * fs
    A = cov / var_t
    B = (1 - fs) - A * (1 - ft)
    C2 = var_s - cov * cov / var_t
    return A, B, C2


def propagated_covariance(ts) -> np.ndarray:
    """Cov(x_tj, x_tk | x0) by walking the Markov chain: Var recursion, then products of a's."""
    ts = [float(t) for t in ts]
    var = [ts[0] ** 2]
    for s, t in zip(ts[:-1], ts[1:], strict=True):
        a = (1.0 - t) / (1.0 - s)
        b2 = t * t - a * a * s * s
        var.append(a * a * var[-1] + b2)
    K = len(ts)
    S = np.zeros((K, K))
    for j in range(K):
        S[j, j] = var[j]
        gain = 1.0
        for k in range(j + 1, K):
            gain *= (1.0 - ts[k]) / (1.0 - ts[k - 1])
            S[j, k] = S[k, j] = gain * var[j]
    return S


def assert_within_se(estimate, expected, se, what: str) -> None:
    z = np.abs(np.asarray(estimate) - np.asarray(expected)) / np.asarray(se)
    assert np.all(z < Z_MAX), f"{what}: max |z| = {z.max():.2f} (> {Z_MAX} standard errors)"


# ---------------------------------------------------------------------------------------------
# 1. Markov chain keeps the marginals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.0, 0.6])
def test_forward_trajectory_keeps_marginals(shift):
    ts = sch.time_grid(4, t_min=0.02, shift=shift)
    x = draw(X0, ts, N_MC, seed=11)  # (N, 5, 3)
    assert x.shape == (N_MC, len(ts), X0.size)
    for k, t in enumerate(ts):
        lvl = x[:, k, :]
        assert_within_se(lvl.mean(0), (1.0 - t) * X0, t / math.sqrt(N_MC), f"mean at t={t:.3f}")
        assert_within_se(lvl.std(0), t, t / math.sqrt(2 * N_MC), f"std at t={t:.3f}")


def test_forward_trajectory_per_example_grids_and_shapes():
    n = 50_000
    t_min = np.repeat([0.01, 0.2], n)
    ts = sch.time_grids(4, t_min)  # (2n, 5)
    x0 = np.full((2 * n, 2, 3), 0.5)
    x = sch.forward_trajectory(x0, ts, np.random.default_rng(3))
    assert x.shape == (2 * n, 5, 2, 3)
    for g, tm in enumerate([0.01, 0.2]):
        lvl0 = x[g * n : (g + 1) * n, 0].reshape(-1)  # 6n draws, all at level t_min
        m = lvl0.size
        assert_within_se(lvl0.mean(), (1 - tm) * 0.5, tm / math.sqrt(m), f"mean t_min={tm}")
        assert_within_se(lvl0.std(), tm, tm / math.sqrt(2 * m), f"std t_min={tm}")
    # the last level is pure noise whatever t_min: N(0, 1)
    top = x[:, -1].reshape(-1)
    assert_within_se(top.mean(), 0.0, 1 / math.sqrt(top.size), "mean at t=1")
    assert_within_se(top.std(), 1.0, 1 / math.sqrt(2 * top.size), "std at t=1")


def test_forward_trajectory_from_t_min_zero_starts_at_data():
    ts = sch.time_grid(4)
    x = draw(X0, ts, 10, seed=0)
    np.testing.assert_array_equal(x[:, 0], np.broadcast_to(X0, (10, 3)))


# ---------------------------------------------------------------------------------------------
# 2. posterior coefficients (Prop. 2)
# ---------------------------------------------------------------------------------------------

POSTERIOR_PAIRS = [
    (0.1, 0.3),
    (0.25, 0.5),
    (0.5, 0.75),
    (0.02, 0.97),
    (0.7, 0.9),
    (0.3, 1.0),  # t = 1
    (0.9, 1.0),
    (0.0, 0.4),  # s = 0
    (0.0, 1.0),
    (0.5 - 1e-9, 0.5),  # s very close to t
    (0.999, 0.999 + 1e-10),
]


@pytest.mark.parametrize("s,t", POSTERIOR_PAIRS)
def test_posterior_coeffs_match_exact_conditioning(s, t):
    A, B, C = sch.posterior_coeffs(s, t)
    eA, eB, eC2 = exact_posterior(s, t)
    # A, B, C^2 are O(1) or vanish; compare relatively, with a tiny absolute floor for zeros
    assert A == pytest.approx(float(eA), rel=1e-12, abs=1e-15), "A"
    assert B == pytest.approx(float(eB), rel=1e-9, abs=1e-15), "B"
    assert C * C == pytest.approx(float(eC2), rel=1e-9, abs=1e-18), "C^2"
    assert C >= 0.0


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.95])
def test_posterior_coeffs_at_pure_noise(s):
    A, B, C = sch.posterior_coeffs(s, 1.0)
    assert A == 0.0
    assert B == pytest.approx(1.0 - s, rel=1e-15)
    assert C == pytest.approx(s, rel=1e-15)


def test_posterior_coeffs_at_clean_start():
    t = np.array([0.2, 0.6, 1.0])
    A, B, C = sch.posterior_coeffs(0.0, t)
    np.testing.assert_allclose(A, 0.0, atol=0)
    np.testing.assert_allclose(B, 1.0, rtol=1e-15)
    np.testing.assert_allclose(C, 0.0, atol=0)


@pytest.mark.parametrize("s,t", [(0.2, 0.6), (0.5, 0.8), (0.3, 1.0)])
def test_posterior_monte_carlo_regression(s, t):
    x0 = 0.4
    x = draw(np.array([x0]), [s, t], N_MC, seed=7)[:, :, 0]  # (N, 2)
    xs, xt = x[:, 0], x[:, 1]
    slope, intercept = np.polyfit(xt, xs, 1)
    resid = xs - (slope * xt + intercept)
    res_var = resid.var(ddof=2)
    A, B, C = sch.posterior_coeffs(s, t)
    sd_t = xt.std()
    se_slope = C / (math.sqrt(N_MC) * sd_t)
    se_icpt = C * math.sqrt(1 / N_MC + xt.mean() ** 2 / (N_MC * sd_t**2))
    assert_within_se(slope, A, se_slope, "regression slope vs A")
    assert_within_se(intercept, B * x0, se_icpt, "regression intercept vs B x0")
    assert_within_se(res_var, C * C, C * C * math.sqrt(2 / N_MC), "residual variance vs C^2")


# ---------------------------------------------------------------------------------------------
# 3. trajectory covariance (Prop. 3)
# ---------------------------------------------------------------------------------------------

GRIDS = [
    sch.time_grid(4, t_min=0.05),
    sch.time_grid(4, t_min=0.02, shift=0.6),
    np.array([0.1, 0.35, 0.6, 0.9]),  # last level < 1
]


@pytest.mark.parametrize("ts", GRIDS, ids=["plain", "shifted", "no-noise-top"])
def test_trajectory_covariance_matches_propagated_chain(ts):
    S = sch.trajectory_covariance(ts)
    assert S.shape == (len(ts), len(ts))
    np.testing.assert_allclose(S, propagated_covariance(ts), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(S, S.T)
    np.testing.assert_allclose(np.diag(S), np.asarray(ts) ** 2, rtol=1e-12)
    assert np.all(np.linalg.eigvalsh(S) > 0), "S must be positive definite when t_0 > 0"
    np.linalg.cholesky(S)


def test_trajectory_covariance_top_level_is_independent_unit_noise():
    ts = sch.time_grid(8, t_min=0.01)
    S = sch.trajectory_covariance(ts)
    assert S[-1, -1] == 1.0
    np.testing.assert_array_equal(S[-1, :-1], 0.0)


def test_trajectory_covariance_with_clean_start_is_singular():
    S = sch.trajectory_covariance(sch.time_grid(4, t_min=0.0))
    np.testing.assert_array_equal(S[0], 0.0)
    assert np.linalg.eigvalsh(S).min() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("ts", GRIDS[:2], ids=["plain", "shifted"])
def test_trajectory_covariance_matches_monte_carlo(ts):
    x = draw(np.array([0.3]), ts, N_MC, seed=5)[:, :, 0]  # (N, K)
    S_hat = np.cov(x, rowvar=False)
    S = sch.trajectory_covariance(ts)
    d = np.diag(S)
    se = np.sqrt((np.outer(d, d) + S**2) / N_MC)
    assert_within_se(S_hat, S, se, "empirical trajectory covariance")


# ---------------------------------------------------------------------------------------------
# 4. time grids and the resolution shift
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4, 8, 16])
@pytest.mark.parametrize("shift", [0.0, 0.6, 1.15])
def test_time_grid_structure(steps, shift):
    t_min = 0.01
    g = sch.time_grid(steps, t_min=t_min, shift=shift)
    assert g.dtype == np.float64 and g.shape == (steps + 1,)
    assert g[0] == t_min
    assert g[-1] == pytest.approx(1.0, abs=1e-15)  # exactness: test_shifted_grid_ends_exactly_at_one
    assert np.all(np.diff(g) > 0)


# mu values for which shift_time(1.0, mu) rounds away from 1 (found by this file; see the docstring)
ROUNDING_SHIFTS = [-0.7, 0.6, 1.15, 0.5 + 0.65 * (1024 - 256) / (4096 - 256)]

ENDPOINT_BUG = (
    "BUG in schedule.shift_time: e*t / (e*t + 1.0 - t) evaluates the denominator as "
    "((e*t + 1.0) - t), which at t = 1 is (e + 1) - 1 != e in float64, so shift_time(1, mu) = "
    "1 +- 1 ulp and time_grid(...)[-1] is not exactly 1 (the top level is not pure noise; "
    "t > 1 for some mu). Fix: e*t / (e*t + (1.0 - t))."
)


@pytest.mark.parametrize("mu", ROUNDING_SHIFTS)
def test_shift_time_maps_one_exactly_to_one(mu):
    assert sch.shift_time(1.0, mu) == 1.0, f"mu={mu}: got {sch.shift_time(1.0, mu)!r}. {ENDPOINT_BUG}"


@pytest.mark.parametrize("shift", ROUNDING_SHIFTS)
def test_shifted_grid_ends_exactly_at_one(shift):
    top = sch.time_grid(4, t_min=0.01, shift=shift)[-1]
    assert top == 1.0, f"shift={shift}: t_T = {top!r}. {ENDPOINT_BUG}"


@pytest.mark.parametrize("steps", [1, 4, 16])
def test_time_grid_unshifted_is_uniform(steps):
    g = sch.time_grid(steps)
    expected = [0.0] + [k / steps for k in range(1, steps + 1)]
    np.testing.assert_allclose(g, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("shift", [0.3, 0.6, 1.15])
def test_positive_shift_moves_interior_levels_up(shift):
    steps = 8
    g = sch.time_grid(steps, shift=shift)
    base = np.arange(1, steps) / steps
    assert np.all(g[1:-1] > base)
    e = math.exp(shift)
    expected = [e / (e + 1 / t - 1) for t in base]  # the paper's form of the shift
    np.testing.assert_allclose(g[1:-1], expected, rtol=1e-14)


@pytest.mark.parametrize("mu", [-0.7, 0.0, 0.5, 1.15, 3.0])
def test_shift_time_values(mu):
    assert sch.shift_time(0.0, mu) == 0.0
    assert sch.shift_time(1.0, mu) == pytest.approx(1.0, abs=1e-15)  # exactness tested above
    t = np.linspace(0.01, 0.99, 25)
    e = math.exp(mu)
    expected = e / (e + 1.0 / t - 1.0)
    np.testing.assert_allclose(sch.shift_time(t, mu), expected, rtol=1e-13)
    assert np.all(np.diff(sch.shift_time(t, mu)) > 0), "shift must be monotone"


def test_shift_for_length_endpoints():
    assert sch.shift_for_length(256) == pytest.approx(0.5)
    assert sch.shift_for_length(4096) == pytest.approx(1.15)
    assert sch.shift_for_length(2176) == pytest.approx(0.5 + 0.65 / 2)


@pytest.mark.parametrize(
    "steps,t_min,shift",
    [
        (0, 0.0, 0.0),  # no steps
        (-1, 0.0, 0.0),
        (4, 0.25, 0.0),  # t_min == t_1
        (4, 0.3, 0.0),  # t_min > t_1
        (4, -0.01, 0.0),  # negative
        (2, 0.6, 0.0),
        (4, math.exp(0.6) * 0.25 / (math.exp(0.6) * 0.25 + 0.75), 0.6),  # == shifted t_1
    ],
)
def test_time_grid_rejects_invalid_input(steps, t_min, shift):
    with pytest.raises(ValueError):
        sch.time_grid(steps, t_min=t_min, shift=shift)


@pytest.mark.parametrize("shift", [0.0, 0.6])
def test_time_grids_broadcasts_per_example_t_min(shift):
    steps = 4
    t_min = np.array([0.0, 0.01, 0.05, 0.1])
    G = sch.time_grids(steps, t_min, shift=shift)
    assert G.shape == (4, steps + 1) and G.dtype == np.float64
    np.testing.assert_array_equal(G[:, 0], t_min)
    e = math.exp(shift)
    upper = [e * (k / steps) / (e * (k / steps) + 1 - k / steps) for k in range(1, steps + 1)]
    for row in G:
        np.testing.assert_allclose(row[1:], upper, rtol=1e-14)
        assert np.all(np.diff(row) > 0)


def test_sample_t_min_range_and_shape():
    x = sch.sample_t_min(np.random.default_rng(0), 10_000, 0.05)
    assert x.shape == (10_000,)
    assert x.min() >= 0.0 and x.max() <= 0.05
    assert_within_se(x.mean(), 0.025, 0.05 / math.sqrt(12 * x.size), "U[0, 0.05] mean")


# ---------------------------------------------------------------------------------------------
# 5. torch tensors give the same numbers as numpy
# ---------------------------------------------------------------------------------------------


def test_coefficients_accept_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(21)
    u = np.sort(rng.uniform(0.0, 1.0, size=(2, 64)), axis=0)
    s, t = u[0], u[1]
    t[:4] = 1.0  # include the pure-noise level
    s_t, t_t = torch.from_numpy(s.copy()), torch.from_numpy(t.copy())
    cases = {
        "marginal": (sch.marginal_coeffs(t), sch.marginal_coeffs(t_t)),
        "markov": (sch.markov_coeffs(s, t), sch.markov_coeffs(s_t, t_t)),
        "posterior": (sch.posterior_coeffs(s, t), sch.posterior_coeffs(s_t, t_t)),
        "shift": ((sch.shift_time(t, 0.6),), (sch.shift_time(t_t, 0.6),)),
    }
    for name, (ref, got) in cases.items():
        for i, (r, g) in enumerate(zip(ref, got, strict=True)):
            assert isinstance(g, torch.Tensor) and g.dtype == torch.float64, f"{name}[{i}] type"
            np.testing.assert_allclose(g.numpy(), r, rtol=1e-15, atol=0, err_msg=f"{name}[{i}]")


# ---------------------------------------------------------------------------------------------
# 6. Markov coefficients
# ---------------------------------------------------------------------------------------------


def test_markov_b_squared_textbook_form():
    rng = np.random.default_rng(1)
    u = np.sort(rng.uniform(0.0, 1.0, size=(2, 10_000)), axis=0)
    s, t = u[0], u[1]
    a, b = sch.markov_coeffs(s, t)
    a_ref = (1.0 - t) / (1.0 - s)
    np.testing.assert_allclose(a, a_ref, rtol=1e-15)
    # the textbook form cancels as s -> t, the implementation's (t + s - 2ts) as s, t -> 1
    # (measured: ~20 ulp at s ~ 0.99); 1e-13 is ~500 ulp of t^2 <= 1, far below any real error
    np.testing.assert_allclose(b**2, t**2 - a_ref**2 * s**2, rtol=0, atol=1e-13)
    assert np.all(b >= 0)


@pytest.mark.parametrize(
    "s,t", [(0.3, 0.3 + 1e-12), (0.9, 0.9 + 1e-9), (0.0, 0.5), (0.4, 1.0), (0.99, 0.998)]
)
def test_markov_b_exact_near_diagonal(s, t):
    a, b = sch.markov_coeffs(s, t)
    S, T = Fraction(s), Fraction(t)
    A = (1 - T) / (1 - S)
    assert b * b == pytest.approx(float(T * T - A * A * S * S), rel=1e-12)


def test_markov_step_from_clean_data():
    t = np.array([0.1, 0.5, 1.0])
    a, b = sch.markov_coeffs(0.0, t)
    np.testing.assert_allclose(a, 1.0 - t, rtol=1e-15)
    np.testing.assert_allclose(b, t, rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# 7. the likelihood bound (docs/design.md 4) and the 8-bit scale
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ts", [[0.025, 0.25, 0.5, 0.75, 1.0], [0.01, 0.3, 1.0]])
def test_bound_offset_is_the_expected_log_ratio(ts):
    """The offset per dim is E_q[-log p(x0 | x_t0) + log q(x_t0..x_tT | x0)] / D, with the decoder
    N(x_t0 / (1 - t0), (t0 / (1 - t0))^2) and q the marginal at t0 times the Markov steps: here by
    Monte Carlo over trajectories drawn step by step (textbook a, b), log densities from scipy."""
    from scipy.stats import norm

    rng = np.random.default_rng(13)
    x0 = np.linspace(-0.9, 0.9, 8)  # D = 8
    x = (1 - ts[0]) * x0 + ts[0] * rng.standard_normal((N_MC, 8))
    t0 = ts[0]
    total = -norm.logpdf(x0, x / (1 - t0), t0 / (1 - t0)) + norm.logpdf(x, (1 - t0) * x0, t0)
    for s, t in zip(ts[:-1], ts[1:], strict=True):
        a = (1 - t) / (1 - s)
        b = math.sqrt(t * t - a * a * s * s)
        x_next = a * x + b * rng.standard_normal(x.shape)
        total += norm.logpdf(x_next, a * x, b)
        x = x_next
    per_dim = total.mean(1)  # (N,)
    assert_within_se(per_dim.mean(), sch.bound_offset_per_dim(ts), per_dim.std() / math.sqrt(N_MC), "offset")


def test_bits_per_dim_on_the_8bit_scale():
    """Uniform on [-1, 1]^D is 8 bits per pixel; all mass uniform inside one of the 256 bins is 0 bits."""
    assert sch.bits_per_dim(math.log(2.0)) == pytest.approx(8.0, rel=1e-12)
    assert sch.bits_per_dim(-math.log(128.0)) == pytest.approx(0.0, abs=1e-12)
    ts = [0.025, 0.5, 1.0]
    assert sch.bound_bits_per_dim(0.7, ts) == pytest.approx(sch.bits_per_dim(0.7 + sch.bound_offset_per_dim(ts)))
