"""Exact inversion of the transporter on the runtime: x = f_T^-1(u, t, T) (docs/design.md 3a), numpy only.

The blocks are inverted in reverse order, each by the drivers of ``ntm_edge.decoding`` (the same ones
the torch transporter runs), here over the bundle's graphs:

- ``jacobi``: (Gauss-Seidel-)Jacobi, ``decoding.solve_segments`` over the block's one-pass graph
  ``transporter_jacobi_<i>`` (x <- mu(x_<n) + exp(alpha(x_<n)) u); ``segments`` G > 1 solves the
  tokens in G segments in scan order. The graph takes whole images, so a segment's pass runs on the
  full sequence (the tokens after the segment cannot reach it) and keeps its prefix.
- ``sequential``: ``decoding.decode_tokens`` over the decoding-step graph ``transporter_step_<i>``,
  N - 1 calls with the KV cache in fixed-size buffers (L, B, heads, N, hd) passed in and out.

Settings (method, segments, tol, max_iters; one value or one per block) mean what they mean for
``Transporter.inverse`` and are validated by the same function.
"""

from __future__ import annotations

import numpy as np

from ntm_edge.decoding import DEFAULT_METHOD, DEFAULT_TOL, InverseReport, decode_tokens, inverse_settings, solve_segments
from ntm_edge.numerics import flip_tokens, patchify, unpatchify

from .session import Runtime
from .specs import jacobi_graph, step_graph


class _Layout:
    """Block ``block``'s token layout: images (B, C, H, W) <-> scan-ordered tokens (B, N, D)."""

    def __init__(self, rt: Runtime, block: int, chw: tuple[int, ...]):
        tp = rt.bundle.transporter
        self.p, self.flip, self.chw = tp["patch_size"], tp["flip"][block], chw

    def tokens(self, x: np.ndarray) -> np.ndarray:
        xs = patchify(x, self.p)
        return flip_tokens(xs) if self.flip else xs

    def image(self, xs: np.ndarray) -> np.ndarray:
        xs = flip_tokens(xs) if self.flip else xs
        return unpatchify(np.ascontiguousarray(xs), self.p, *self.chw)


def context_input(context: np.ndarray | None) -> dict[str, np.ndarray]:
    """The graphs' extra input for a contextual transporter: the step's x_t (B, C, H, W)."""
    return {} if context is None else {"context": context}


def jacobi_block(rt: Runtime, block: int, u: np.ndarray, t: np.ndarray, steps: np.ndarray, segments: int = 1,
                 tol: float = DEFAULT_TOL, max_iters: int | None = None, context: np.ndarray | None = None):
    """Invert one block by (GS-)Jacobi passes: u (B, C, H, W) -> x (B, C, H, W), and per segment the
    passes used, final relative change, converged (as ``TarFlowBlock.inverse_jacobi``)."""
    graph, layout = rt[jacobi_graph(block)], _Layout(rt, block, u.shape[1:])
    us = layout.tokens(u)  # (B, N, D) scan order
    ctx = context_input(context)

    def step(x_p: np.ndarray, u_p: np.ndarray) -> np.ndarray:
        e = x_p.shape[1]
        x_full = np.concatenate([x_p, us[:, e:]], axis=1)  # tokens >= e: any values, they cannot reach x_<e
        out = graph(x=layout.image(x_full), u=u, t=t, steps=steps, **ctx)["x_next"]
        return layout.tokens(out)[:, :e]

    xs, *report = solve_segments(step, us, segments, tol, max_iters)
    return (layout.image(xs), *report)


def sequential_block(rt: Runtime, block: int, u: np.ndarray, t: np.ndarray, steps: np.ndarray,
                     context: np.ndarray | None = None) -> np.ndarray:
    """Invert one block token by token: u (B, C, H, W) -> x (B, C, H, W), N - 1 decoding steps."""
    tp = rt.bundle.transporter
    graph, layout = rt[step_graph(block)], _Layout(rt, block, u.shape[1:])
    us = layout.tokens(u)  # (B, N, D) scan order
    empty = np.zeros((tp["layers"], us.shape[0], tp["heads"], us.shape[1], tp["head_dim"]), dtype=np.float32)
    ctx = context_input(context)

    def step(x_token: np.ndarray, n: int, caches: tuple[np.ndarray, np.ndarray]):
        out = graph(x_token=x_token, position=np.array([n], dtype=np.int64), t=t, steps=steps,
                    k_cache=caches[0], v_cache=caches[1], **ctx)
        return out["mu"], out["alpha"], (out["k_cache_out"], out["v_cache_out"])

    return layout.image(decode_tokens(step, us, (empty, empty)))


def check_settings(rt: Runtime, method: str, segments=1, tol=DEFAULT_TOL, max_iters=None):
    """``decoding.inverse_settings`` for this bundle's transporter: one tuple entry per block."""
    tp = rt.bundle.transporter
    return inverse_settings(method, segments, tol, max_iters, tp["num_blocks"], tp["num_tokens"])


def contextual(rt: Runtime) -> bool:
    """Whether the bundle's transporter reads the step's x_t (its graphs take a ``context`` input)."""
    return bool(rt.bundle.config.transporter.context)


def invert(rt: Runtime, u: np.ndarray, t, steps: int, method: str = DEFAULT_METHOD, segments=1, tol=DEFAULT_TOL,
           max_iters=None, context: np.ndarray | None = None) -> tuple[np.ndarray, InverseReport]:
    """x = f_T^-1(u, t, T): u (B, C, H, W), t scalar or (B,) -> x (B, C, H, W), InverseReport (indexed
    as the blocks; the last block is inverted first). Settings as ``Transporter.inverse_with_report``.
    ``context``: the step's x_t (B, C, H, W), which a contextual transporter needs and no other takes."""
    if (context is None) == contextual(rt):
        raise ValueError("a contextual transporter needs the step's x_t as context, and only it takes one")
    segments, tol, max_iters = check_settings(rt, method, segments, tol, max_iters)
    num_blocks, N = rt.bundle.transporter["num_blocks"], rt.bundle.transporter["num_tokens"]
    B = u.shape[0]
    t = np.broadcast_to(np.asarray(t, dtype=np.float32), (B,))
    T = np.full((B,), steps, dtype=np.float32)
    per_block: list = [None] * num_blocks  # (iterations, residuals, converged) of each block
    h = np.asarray(u, dtype=np.float32)
    for i in reversed(range(num_blocks)):  # f_T = blocks[-1] o ... o blocks[0]
        if method == "jacobi":
            h, *per_block[i] = jacobi_block(rt, i, h, t, T, segments[i], tol[i], max_iters[i], context)
        else:
            h, per_block[i] = sequential_block(rt, i, h, t, T, context), ((N - 1,), (0.0,), (True,))
    return h, InverseReport.of_blocks(method, per_block)
