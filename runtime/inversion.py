"""Exact inversion of the transporter on the runtime: x = f_T^-1(u, t, T) (docs/design.md 3a), numpy only.

The blocks are inverted in reverse order, each one of two ways (the torch twins are
``TarFlowBlock.inverse_jacobi`` with one segment and ``TarFlowBlock.inverse``):

- ``jacobi``: iterate the block's one-pass graph x <- mu(x_<n) + exp(alpha(x_<n)) u from x = u until
  the relative change max|x_new - x| / max|x_new| is <= tol (worst example of the batch), or after
  N - 1 passes, when it is exact whatever the change.
- ``sequential``: N - 1 calls of the block's decoding-step graph, one token each, with the KV cache in
  fixed-size buffers (L, B, heads, N, hd) passed in and out.
"""

from __future__ import annotations

import numpy as np

from .session import Runtime
from .specs import jacobi_graph, step_graph

METHODS = ("jacobi", "sequential")
DEFAULT_TOL = 1e-5  # = ntm_edge.transporter.DEFAULT_TOL (a test pins them equal)


def patchify(x: np.ndarray, p: int) -> np.ndarray:
    """(B, C, H, W) -> (B, N, C p p), row-major patch order (``ntm_edge.layers.patchify``)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: np.ndarray, p: int, C: int, H: int, W: int) -> np.ndarray:
    """(B, N, C p p) -> (B, C, H, W); the inverse of ``patchify``."""
    B = tokens.shape[0]
    x = tokens.reshape(B, H // p, W // p, C, p, p)  # (B, h, w, C, p, p)
    return x.transpose(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def relative_change(new: np.ndarray, old: np.ndarray, eps: float = 1e-12) -> float:
    """max|new - old| / max|new| per example, worst example of the batch (float64)."""
    new, old = new.reshape(len(new), -1).astype(np.float64), old.reshape(len(old), -1).astype(np.float64)
    return float((np.abs(new - old).max(1) / (np.abs(new).max(1) + eps)).max())


def jacobi_block(rt: Runtime, block: int, u: np.ndarray, t: np.ndarray, steps: np.ndarray,
                 tol: float = DEFAULT_TOL) -> tuple[np.ndarray, int]:
    """Invert one block by Jacobi passes: u (B, C, H, W) -> x (B, C, H, W), passes used."""
    graph = rt[jacobi_graph(block)]
    bound = rt.bundle.transporter["num_tokens"] - 1  # token k is exact after k passes
    x, used = u, 0
    while used < bound:
        new = graph(x=x, u=u, t=t, steps=steps)["x_next"]
        change = relative_change(new, x)
        x, used = new, used + 1
        if change <= tol:
            break
    return x, used


def sequential_block(rt: Runtime, block: int, u: np.ndarray, t: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, int]:
    """Invert one block token by token: u (B, C, H, W) -> x (B, C, H, W), decoding steps used (N - 1)."""
    tp = rt.bundle.transporter
    graph = rt[step_graph(block)]
    p, flip = tp["patch_size"], tp["flip"][block]
    us = patchify(u, p)  # (B, N, D)
    us = us[:, ::-1] if flip else us  # scan order
    B, N, _ = us.shape
    k_cache = np.zeros((tp["layers"], B, tp["heads"], N, tp["head_dim"]), dtype=np.float32)
    v_cache = np.zeros_like(k_cache)
    xs = np.empty_like(us)
    xs[:, 0] = us[:, 0]  # token 0 passes through: mu = alpha = 0
    for n in range(N - 1):
        out = graph(x_token=xs[:, n], position=np.array([n], dtype=np.int64), t=t, steps=steps,
                    k_cache=k_cache, v_cache=v_cache)
        k_cache, v_cache = out["k_cache_out"], out["v_cache_out"]
        xs[:, n + 1] = us[:, n + 1] * np.exp(out["alpha"]) + out["mu"]  # fp32 island
    xs = xs[:, ::-1] if flip else xs
    return unpatchify(np.ascontiguousarray(xs), p, *u.shape[1:]), N - 1


def invert(rt: Runtime, u: np.ndarray, t, steps: int, method: str = "jacobi", tol: float = DEFAULT_TOL):
    """x = f_T^-1(u, t, T): u (B, C, H, W), t scalar or (B,) -> x (B, C, H, W), passes per block
    (indexed as the blocks; the last block is inverted first)."""
    num_blocks = rt.bundle.transporter["num_blocks"]
    B = u.shape[0]
    t = np.broadcast_to(np.asarray(t, dtype=np.float32), (B,))
    T = np.full((B,), steps, dtype=np.float32)
    passes = [0] * num_blocks
    h = np.asarray(u, dtype=np.float32)
    for i in reversed(range(num_blocks)):  # f_T = blocks[-1] o ... o blocks[0]
        if method == "jacobi":
            h, passes[i] = jacobi_block(rt, i, h, t, T, tol)
        else:
            h, passes[i] = sequential_block(rt, i, h, t, T)
    return h, passes
