"""The noise schedule of a Normalizing Trajectory Model, once, for training and runtime alike.

Equation numbers are those of "Normalizing Trajectory Models" (arXiv 2605.08078).

Conventions: data x0 in [-1, 1], eps ~ N(0, I), time t in [0, 1] with t = 1 pure noise.

    marginal (2.1)        x_t = (1 - t) x0 + t eps                q(x_t | x0) = N((1 - t) x0, t^2 I)
    Markov step (2.3)     x_t = a x_s + b eps',  s < t            a = (1 - t)/(1 - s), b^2 = t^2 - a^2 s^2
    posterior (Prop. 2)   q(x_s | x_t, x0) = N(A x_t + B x0, C^2 I)
    covariance (Prop. 3)  Cov(x_ti, x_tj | x0) = S_ij I,  S_ij = min^2 (1 - max) / (1 - min)
    likelihood (3.4)      -log p(x_t0..x_tT) = -log N(f_T(x_1); 0, I) + sum_k [-log N(f_T(x_s); mu_P, sigma_P^2)
                                                                        - log|det df_T/dx_s|]
    bound (docs/design.md 4)   bits/dim on -log p(x0) from the trajectory NLL (closed-form offset)

This module imports numpy only: the torch-free runtime imports it. The coefficient functions use
plain arithmetic (``*``, ``/``, ``**``), so they take numpy arrays, Python floats and torch tensors
alike, and ``forward_trajectory`` picks its namespace from its argument (``numerics.namespace``): the
training code calls them on tensors and the runtime on arrays, and both get the same numbers.
"""

from __future__ import annotations

import math

import numpy as np

from .numerics import gaussian_nll, namespace, standard_normal

STEP_COUNTS = (4, 8, 16)  # T drawn per example in pairwise training (docs/design.md 2)


def trained_step_counts(objective: str, mode: str, pairwise_steps, steps: int) -> tuple[int, ...] | None:
    """The step counts T a model is trained at: pairwise mode draws T from ``pairwise_steps`` (None:
    ``STEP_COUNTS``), end-to-end mode scores the ``steps``-level grid alone; None for flow matching,
    which trains on continuous t and samples with Euler at any T."""
    if objective == "fm":
        return None
    if mode == "pairwise":
        return tuple(int(T) for T in (pairwise_steps or STEP_COUNTS))
    return (int(steps),)


def scoring_step_count(trained: tuple[int, ...] | None, default: int) -> int:
    """The step count a model's own held-out likelihood is scored at: its default T where it was trained on
    that grid (or on continuous t), else the trained count nearest to it (the larger on a tie). A model
    trained on the 2-step grid alone is scored on that grid, not on a 4-step grid it never saw."""
    if not trained or default in trained:
        return int(default)
    return int(min(trained, key=lambda T: (abs(T - default), -T)))


# ---------------------------------------------------------------------------------------------
# time grid
# ---------------------------------------------------------------------------------------------


def shift_time(t, mu: float):
    """Resolution shift of a time value: sigma = e^mu / (e^mu + 1/t - 1); mu = 0 is the identity.

    Written as e^mu t / (e^mu t + 1 - t), which is the same map and is finite at t = 0.
    """
    if mu == 0.0:
        return t
    e = math.exp(mu)
    return e * t / (e * t + (1.0 - t))  # (1 - t) grouped: exactly 1 at t = 1


def shift_for_length(seq_len: int) -> float:
    """The paper's shift for a sequence of ``seq_len`` tokens: mu = 0.5 + 0.65 (L - 256)/(4096 - 256)."""
    return 0.5 + 0.65 * (seq_len - 256) / (4096 - 256)


def time_grid(steps: int, t_min: float = 0.0, shift: float = 0.0) -> np.ndarray:
    """Levels t_0 < t_1 < ... < t_T = 1 for ``steps`` = T coarse steps.

    Base grid k / T for k = 1..T, shifted by ``shift``; the cleanest level is t_0 = t_min (the
    model keeps a little noise at the bottom of the trajectory). Returns float64, shape (T + 1,).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = np.asarray(shift_time(np.arange(1, steps + 1, dtype=np.float64) / steps, shift))
    if not 0.0 <= t_min < grid[0]:
        raise ValueError(f"t_min must lie in [0, t_1 = {grid[0]:.4f}), got {t_min}")
    return np.concatenate([[t_min], grid])


def time_grids(steps: int, t_min: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """A grid per example: ``t_min`` of shape (B,) -> levels of shape (B, T + 1)."""
    t_min = np.asarray(t_min, dtype=np.float64).reshape(-1, 1)  # (B, 1)
    upper = time_grid(steps, 0.0, shift)[1:]  # (T,)
    return np.concatenate([t_min, np.broadcast_to(upper, (t_min.shape[0], steps))], axis=1)


def t_min_from_uniform(uniform, t_min_low: float, t_min_max: float):
    """Map U[0, 1) draws (numpy or torch, any shape) to t_min ~ U[t_min_low, t_min_max] (docs/design.md 1;
    the paper's low end is 0). Training draws the uniforms from its torch.Generator (exact resume)."""
    return t_min_low + (t_min_max - t_min_low) * uniform


def sample_t_min(rng: np.random.Generator, n: int, t_min_max: float, t_min_low: float = 0.0) -> np.ndarray:
    """t_min ~ U[t_min_low, t_min_max] per example from a numpy generator, shape (n,)."""
    return t_min_from_uniform(rng.random(n), t_min_low, t_min_max)


# ---------------------------------------------------------------------------------------------
# coefficients (arithmetic only: numpy arrays, floats or torch tensors)
# ---------------------------------------------------------------------------------------------


def marginal_coeffs(t):
    """(2.1): x_t = mean * x0 + std * eps with mean = 1 - t, std = t."""
    return 1.0 - t, t


def markov_coeffs(s, t):
    """(2.3): one forward step s -> t (s < t), x_t = a x_s + b eps'.

    b^2 = t^2 - a^2 s^2 = (t - s)(t + s - 2ts) / (1 - s)^2; the factored form, with
    t + s - 2ts written as t(1 - s) + s(1 - t), stays accurate near s ~ t and near 1.
    """
    a = (1.0 - t) / (1.0 - s)
    b = ((t - s) * (t * (1.0 - s) + s * (1.0 - t))) ** 0.5 / (1.0 - s)
    return a, b


def posterior_coeffs(s, t):
    """Prop. 2: q(x_s | x_t, x0) = N(A x_t + B x0, C^2 I) for s < t.

    A = s^2 (1 - t) / (t^2 (1 - s)),  B = (t - s)(t + s - 2ts) / (t^2 (1 - s)),
    C^2 = s^2 (t - s)(t + s - 2ts) / (t^2 (1 - s)^2).   At t = 1: A = 0, B = 1 - s, C = s.
    """
    g = (t - s) * (t * (1.0 - s) + s * (1.0 - t))  # (t - s)(t + s - 2ts)
    A = s * s * (1.0 - t) / (t * t * (1.0 - s))
    B = g / (t * t * (1.0 - s))
    C = s * g**0.5 / (t * (1.0 - s))
    return A, B, C


def trajectory_covariance(ts) -> np.ndarray:
    """Prop. 3: S_ij = min(ti, tj)^2 (1 - max(ti, tj)) / (1 - min(ti, tj)), shape (K, K).

    Where min = max = 1 the ratio is 1 (the pure-noise level has unit variance).
    """
    ts = np.asarray(ts, dtype=np.float64)
    lo = np.minimum(ts[:, None], ts[None, :])
    hi = np.maximum(ts[:, None], ts[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(lo >= 1.0, 1.0, (1.0 - hi) / (1.0 - lo))
    return lo**2 * ratio


def forward_trajectory(x0, ts, rng):
    """Draw x_t0, ..., x_tT from the Markov forward process: the marginal (2.1) at t_0, then one
    step (2.3) per level. The one definition, for numpy (the runtime's audit) and torch (training).

    x0: (B, ...) ; ts: (T + 1,) or (B, T + 1), in x0's namespace -> (B, T + 1, ...).
    rng: a numpy Generator (noise float64) or a torch.Generator (noise in x0's dtype and device);
    the noise is drawn level by level, t_0 first.
    """
    xp = namespace(x0)
    ts = xp.asarray(ts)
    ts = xp.broadcast_to(ts, (x0.shape[0], ts.shape[-1]))  # (B, K)
    bshape = (x0.shape[0],) + (1,) * (x0.ndim - 1)
    mean, std = marginal_coeffs(ts[:, 0].reshape(bshape))
    x = mean * x0 + std * standard_normal(rng, x0)
    levels = [x]
    for k in range(1, ts.shape[1]):
        a, b = markov_coeffs(ts[:, k - 1].reshape(bshape), ts[:, k].reshape(bshape))
        x = a * x + b * standard_normal(rng, x0)
        levels.append(x)
    return xp.stack(levels, axis=1)


def x0_from_velocity(x_t, t, v):
    """x0-hat = x_t - t v: the clean image that a velocity v = eps - x0 of the straight path (2.1)
    points back to (the predictor's "v" parametrisation and the flow-matching baseline)."""
    return x_t - t * v


def decoder_mean(x_t0, t0):
    """x0 ~ x_t0 / (1 - t0): the mean of the decoder p(x0 | x_t0) that leaves the cleanest level
    (the marginal (2.1) scales x0 by 1 - t0). Arrays, tensors or floats; t0 a float or broadcastable."""
    return x_t0 / (1.0 - t0)


# ---------------------------------------------------------------------------------------------
# likelihood bookkeeping (numpy or torch)
# ---------------------------------------------------------------------------------------------


def step_nll(u_s, logdet_s, mu, log_sigma):
    """Exact -log p(x_s | x_t) of one step (paper 3.2-3.4): -log N(f_T(x_s); mu_P, sigma_P^2) -
    log|det df_T/dx_s|. u_s (B, ...) = f_T(x_s), logdet_s (B,), mu, log_sigma (B, ...) -> (B,)."""
    return gaussian_nll(u_s, mu, log_sigma) - logdet_s


def trajectory_nll(u, logdet, mu, log_sigma):
    """Exact -log p(x_t0, ..., x_tT) in nats (paper 3.4): the top level t_T = 1 is N(0, I), then one
    ``step_nll`` per step k = T .. 1.

    u (B, K, ...): f_T of every level t_0 .. t_T; logdet (B, K); mu, log_sigma (B, T, ...): entry
    k - 1 is f_P's Gaussian over level k - 1 given level k -> (B,).
    """
    return sum_levels(level_nll(u, logdet, mu, log_sigma))


def level_nll(u, logdet, mu, log_sigma):
    """``trajectory_nll`` one level at a time (same arguments) -> (B, K) ordered t_0 .. t_T: entry k < T
    is -log p(x_tk | x_tk+1), the step that draws level k, and entry T the top level's N(0, I) term.
    Compared between two models on the same trajectories, it says which step a likelihood gain is in."""
    xp = namespace(u)
    B, K = logdet.shape
    T = K - 1
    flat = lambda v: v.reshape(B * T, *v.shape[2:])  # noqa: E731  (B, T, ...) -> (B*T, ...)
    steps = step_nll(flat(u[:, :-1]), logdet[:, :-1].reshape(B * T), flat(mu), flat(log_sigma)).reshape(B, T)
    top = u[:, -1]
    top_nll = step_nll(top, logdet[:, -1], xp.zeros_like(top), xp.zeros_like(top))
    return xp.concatenate((steps, top_nll[:, None]), axis=1)


def sum_levels(levels):
    """(B, K) terms of ``level_nll`` -> the trajectory NLL (B,), summed in a fixed order (top level, then
    the steps), so that every caller gets the same float."""
    return levels[:, -1] + levels[:, :-1].sum(1)


def bound_offset_per_dim(ts) -> np.ndarray:
    """Turn a trajectory NLL into a variational bound on -log p(x0) (docs/design.md 4), per dimension.

    With the Markov forward process as q and the decoder p(x0 | x_t0) = N(x_t0 / (1 - t0),
    (t0 / (1 - t0))^2 I), -log p(x0) <= E_q[-log p(x0 | x_t0) - log p(x_t0..x_tT) + log q(x_t0..x_tT | x0)],
    and the two Gaussian terms have closed-form expectations (log t0 cancels between them):

        bound / D = NLL_traj / D - (T/2) log(2 pi e) - sum_k log b_k - log(1 - t0)

    ts: (T + 1,) or (B, T + 1) -> the offset to add to NLL_traj / D, shape () or (B,).
    """
    ts = np.asarray(ts, dtype=np.float64)
    s, t = ts[..., :-1], ts[..., 1:]
    _, b = markov_coeffs(s, t)
    T = ts.shape[-1] - 1
    return -0.5 * T * np.log(2 * np.pi * np.e) - np.log(b).sum(-1) - np.log1p(-ts[..., 0])


def bits_per_dim(nats_per_dim, bins: int = 256):
    """Nats per dim of data in [-1, 1] (bin width 2 / bins) -> bits per dim on the 8-bit scale."""
    return (np.asarray(nats_per_dim) + np.log(bins / 2)) / np.log(2)


def bound_bits_per_dim(trajectory_nats_per_dim, ts, bins: int = 256):
    """The variational bound on -log p(x0) in bits/dim on the 8-bit scale (docs/design.md 4), from the
    trajectory NLL per dim (nats) on the grid ts: ``bits_per_dim`` of NLL / D + ``bound_offset_per_dim``."""
    return bits_per_dim(trajectory_nats_per_dim + bound_offset_per_dim(ts), bins)
