"""Plain arithmetic of the method, written once for numpy arrays and torch tensors alike.

The torch model, the exported graphs (traced with torch ops) and the torch-free runtime (numpy) call
the same functions. Each picks its namespace from its argument (``namespace``), in the array-API
habit: numpy unless the argument is a torch tensor. This module imports numpy only; torch is never
imported here (a tensor argument means torch is loaded already).

    HALF_LOG_2PI, gaussian_nll     -log N(x; mu, sigma^2), summed per example (fp32 island)
    guided_gaussian                classifier-free guidance on a Gaussian (paper C.5, as STARFlow)
    dequantize, to_uint8           8-bit pixels <-> [-1, 1] (uniform dequantisation; rounding)
    patchify, unpatchify           images <-> patch tokens, row-major
    relative_change                the stopping rule of the fixed-point inversions
    at_least_fp32                  the marker of an fp32 island

Dtypes follow the inputs: float32 in, float32 out; float64 in, float64 out; fp16/bf16 are upcast to
float32 where a function says "fp32 island".
"""

from __future__ import annotations

import math
import sys

import numpy as np

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------
# namespace helpers
# ---------------------------------------------------------------------------------------------


def namespace(x):
    """The array module of ``x``: torch for a torch tensor, else numpy."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(x, torch.Tensor) else np


def is_torch(x) -> bool:
    return namespace(x) is not np


def permute(x, axes: tuple[int, ...]):
    """Reorder the axes (numpy ``transpose``, torch ``permute``)."""
    return x.permute(*axes) if is_torch(x) else x.transpose(axes)


def flip_tokens(x):
    """Reverse axis 1 (the token axis of (B, N, D) sequences)."""
    return x.flip(1) if is_torch(x) else x[:, ::-1]


def to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if is_torch(x) else np.asarray(x)


def at_least_fp32(x):
    """Upcast fp16/bf16 (and integers) to float32 and leave float32/float64 alone: an fp32 island."""
    if is_torch(x):
        return x.to(namespace(x).promote_types(x.dtype, namespace(x).float32))
    return x.astype(np.promote_types(x.dtype, np.float32), copy=False)


def uniform(rng, like):
    """U[0, 1) of ``like``'s shape: numpy float64 from a numpy Generator, or torch (``like``'s device,
    float32) from a torch.Generator (None: the global one)."""
    if is_torch(like):
        return namespace(like).rand(tuple(like.shape), generator=rng, device=like.device)
    return (rng if rng is not None else np.random.default_rng()).random(like.shape)


def standard_normal(rng, like):
    """N(0, 1) of ``like``'s shape: numpy float64, or torch in ``like``'s dtype and device."""
    if is_torch(like):
        return namespace(like).randn(tuple(like.shape), generator=rng, device=like.device, dtype=like.dtype)
    return (rng if rng is not None else np.random.default_rng()).standard_normal(like.shape)


# ---------------------------------------------------------------------------------------------
# the formulas
# ---------------------------------------------------------------------------------------------


def gaussian_nll(x, mu, log_sigma):
    """-log N(x; mu, sigma^2), summed over all but the first axis: (B, ...) -> (B,). fp32 island.

    Sums over many dimensions: the runtime's audit passes float64 arrays, the torch model float32.
    """
    xp = namespace(x)
    x, mu, log_sigma = at_least_fp32(x), at_least_fp32(mu), at_least_fp32(log_sigma)
    z = (x - mu) * xp.exp(-log_sigma)
    return (0.5 * z * z + log_sigma + HALF_LOG_2PI).reshape(x.shape[0], -1).sum(1)


def guided_gaussian(mu_c, ls_c, mu_u, ls_u, w):
    """Classifier-free guidance on a Gaussian (paper C.5, as STARFlow); w = 0 is the conditional.

    r = min(sigma_c / sigma_u, 1)^2,  sigma = sigma_c / sqrt(1 + w - w r),
    mu = ((1 + w) mu_c - w r mu_u) / (1 + w - w r).   Log-scales in, log-scale out.
    w: a Python float, or a tensor of the graph (the exported sampler loop takes it as an input).
    Where sigma_c < sigma_u this is the normalised p_c^(1 + w) / p_u^w; elsewhere (r = 1) the mean is
    extrapolated, (1 + w) mu_c - w mu_u, at the conditional scale.
    """
    xp = namespace(mu_c)
    r = xp.exp(2.0 * (ls_c - ls_u).clip(max=0.0))
    denom = 1.0 + w - w * r
    return ((1.0 + w) * mu_c - w * r * mu_u) / denom, ls_c - 0.5 * xp.log(denom)


def dequantize(images, rng=None):
    """uint8 (B, H, W, C) -> (B, C, H, W) in [-1, 1] with uniform dequantisation:
    x = (pixel + U[0, 1)) / 128 - 1, so a density on x is a density on the 8-bit scale / 128^D.

    rng: a torch.Generator for a tensor (float32 out), a numpy Generator for an array (float64 out).
    """
    x = permute(images, (0, 3, 1, 2))  # (B, C, H, W), still uint8
    return (x + uniform(rng, x)) / 128.0 - 1.0


def to_uint8(x) -> np.ndarray:
    """Images in [-1, 1], (B, C, H, W) -> uint8 (B, H, W, C) numpy: clip, then round to the nearest
    of the 256 levels (pixel / 127.5 - 1)."""
    levels = ((x.clip(-1.0, 1.0) + 1.0) * 127.5).round()
    return to_numpy(permute(levels, (0, 2, 3, 1))).astype(np.uint8)


def patchify(x, p: int):
    """(B, C, H, W) -> (B, N, C p p), N = (H/p)(W/p), row-major patch order."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
    return permute(x, (0, 2, 4, 1, 3, 5)).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens, p: int, C: int, H: int, W: int):
    """(B, N, C p p) -> (B, C, H, W); the inverse of ``patchify``."""
    B = tokens.shape[0]
    x = tokens.reshape(B, H // p, W // p, C, p, p)  # (B, h, w, C, p, p)
    return permute(x, (0, 3, 1, 4, 2, 5)).reshape(B, C, H, W)


def relative_change(new, old, eps: float = 1e-12) -> float:
    """max|new - old| / max|new| per example (B, ...), worst example of the batch (fp32 island).

    The stopping rule of the fixed-point inversions (``decoding.solve_segments``)."""
    xp = namespace(new)
    new, old = at_least_fp32(new), at_least_fp32(old)
    new, old = new.reshape(new.shape[0], -1), old.reshape(old.shape[0], -1)
    return (xp.amax(abs(new - old), axis=1) / (xp.amax(abs(new), axis=1) + eps)).max().item()
