"""Algorithm 2 (steps 1-2, all in u-space), written once over a ``predict`` callable, and its noise
convention. Torch-free: the torch model (``NTM.sample_levels``), the unrolled exported graph
(``export.graphs.SamplerLoopGraph``, traced with torch ops) and the runtime (numpy + onnxruntime,
``runtime.sampler``) run this same loop.

    1. u_T ~ N(0, I)
    2. for k = T .. 1: (mu, sigma) = f_P(u_tk, t_k, t_k-1, y), guided (C.5);  u_tk-1 = mu + sigma z

Noise convention (same seed, same images on every path): the noise comes from one
``np.random.default_rng(seed)``, drawn per chunk of ``NOISE_BATCH`` prompts as u_T, then one z per
step (k = T .. 1), each ``standard_normal((n, C, H, W), dtype=float32)`` (``draw_noise``).

Temperature tau (``--temperature``): every draw is scaled by tau, so u_T ~ N(0, tau^2 I) and each step
draws u_s = mu + tau sigma z. tau = 1 is Algorithm 2 exactly (the draws are not touched); tau < 1 trades
diversity for fidelity, as classifier-free guidance does, without guidance's second predictor pass.
The exported graphs take the noise as an input, so a temperature needs no re-export.
"""

from __future__ import annotations

import numpy as np

from .numerics import namespace

NOISE_BATCH = 256  # prompts per noise draw; the torch sampler, the runtime and the bundle manifest read it


def draw_noise(rng: np.random.Generator, n: int, shape: tuple[int, ...], steps: int,
               temperature: float = 1.0) -> list[np.ndarray]:
    """[u_T, z for step T, ..., z for step 1], each float32 (n, *shape): the noise of one chunk, each
    draw scaled by ``temperature`` (1: untouched, bit for bit)."""
    draws = [rng.standard_normal((n, *shape), dtype=np.float32) for _ in range(steps + 1)]
    if temperature != 1.0:
        draws = [np.float32(temperature) * z for z in draws]
    return draws


def reverse_levels(predict, noise, ts, transport=None):
    """Steps 1-2 of Algorithm 2 -> the u levels (B, T + 1, ...), ordered t_0 .. t_T.

    predict(u_t, t, s) -> mu, log_sigma of the (guided) Gaussian over u_s; noise: [u_T, z_T, ..., z_1]
    as ``draw_noise`` orders it (arrays or tensors); ts: the grid t_0 .. t_T (indexable, T + 1 entries).
    transport(u_s, x_t, s) -> x_s: a contextual transporter's inverse, applied after every draw, so that
    the levels are x (the top level is u_T = x_T); None keeps them in u-space.
    """
    steps = len(noise) - 1
    levels = [noise[0]]  # 1. u_T ~ N(0, I)
    for j, k in enumerate(range(steps, 0, -1)):  # 2. u_{k-1} = mu + sigma z
        mu, log_sigma = predict(levels[-1], ts[k], ts[k - 1])
        level = mu + namespace(mu).exp(log_sigma) * noise[j + 1]
        levels.append(level if transport is None else transport(level, levels[-1], ts[k - 1]))
    return namespace(noise[0]).stack(levels[::-1], axis=1)
