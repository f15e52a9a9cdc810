"""The noise schedule of a Normalizing Trajectory Model, once, for training and runtime alike.

Equation numbers are those of "Normalizing Trajectory Models" (arXiv 2605.08078).

Conventions: data x0 in [-1, 1], eps ~ N(0, I), time t in [0, 1] with t = 1 pure noise.

    marginal (2.1)        x_t = (1 - t) x0 + t eps                q(x_t | x0) = N((1 - t) x0, t^2 I)
    Markov step (2.3)     x_t = a x_s + b eps',  s < t            a = (1 - t)/(1 - s), b^2 = t^2 - a^2 s^2
    posterior (Prop. 2)   q(x_s | x_t, x0) = N(A x_t + B x0, C^2 I)
    covariance (Prop. 3)  Cov(x_ti, x_tj | x0) = S_ij I,  S_ij = min^2 (1 - max) / (1 - min)

This module imports numpy only: the torch-free runtime imports it. The coefficient functions use
plain arithmetic (``*``, ``/``, ``**``), so they take numpy arrays, Python floats and torch tensors
alike; the training code calls them on tensors and the runtime on arrays, and both get the same
numbers.
"""

from __future__ import annotations

import math

import numpy as np

STEP_COUNTS = (4, 8, 16)  # T drawn per example in pairwise training (docs/design.md 2)


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


def forward_trajectory(x0: np.ndarray, ts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw x_t0, ..., x_tT from the Markov forward process (numpy; the torch twin is in model.py).

    x0: (B, ...) ; ts: (T + 1,) or (B, T + 1) -> (B, T + 1, ...).
    """
    ts = np.broadcast_to(np.asarray(ts, dtype=np.float64), (x0.shape[0], np.shape(ts)[-1]))
    bshape = (x0.shape[0],) + (1,) * (x0.ndim - 1)
    mean, std = marginal_coeffs(ts[:, 0].reshape(bshape))
    x = mean * x0 + std * rng.standard_normal(x0.shape)
    levels = [x]
    for k in range(1, ts.shape[1]):
        a, b = markov_coeffs(ts[:, k - 1].reshape(bshape), ts[:, k].reshape(bshape))
        x = a * x + b * rng.standard_normal(x0.shape)
        levels.append(x)
    return np.stack(levels, axis=1)


# ---------------------------------------------------------------------------------------------
# likelihood bookkeeping
# ---------------------------------------------------------------------------------------------


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
