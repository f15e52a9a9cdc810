"""Exact inversion of one autoregressive flow block, written once over a step callable (docs/design.md 3a).

A TarFlow block maps x to u token by token in its scan order, u_n = (x_n - mu(x_<n)) exp(-alpha(x_<n))
(``affine_forward``), so x_n = mu(x_<n) + exp(alpha(x_<n)) u_n (``affine_inverse``). Two exact ways to run that inverse:

- ``decode_tokens``: sequential decoding, one token per step with a fixed-size KV cache. ``step`` is
  ``TarFlowBlock.decode_step`` for torch and the exported ``transporter_step_<i>`` graph on the runtime.
- ``solve_segments``: (Gauss-Seidel-)Jacobi fixed-point decoding (GS-Jacobi, arXiv 2505.12849). The
  tokens are split into G segments solved in scan order (Gauss-Seidel over segments); inside a segment
  the parallel pass x <- mu(x_<n) + exp(alpha(x_<n)) u (``step``: ``TarFlowBlock.jacobi_step`` for
  torch, the ``transporter_jacobi_<i>`` graph on the runtime) is iterated on the prefix up to the
  segment's end, earlier segments frozen. Pass k makes tokens s .. s+k-1 of segment [s, e) exact
  (token 0 is exact from the start, x_0 = u_0), so a segment never needs more than e - s passes
  (e - 1 for the first); it stops earlier once the relative change is <= tol.

Both drivers work on (B, N, D) token sequences in scan order, numpy arrays or torch tensors; the
settings (method, segments, tol, max_iters: one value, or one per block) are validated here once for
the torch transporter and the runtime. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConfigError
from .numerics import namespace, relative_change

METHODS = ("jacobi", "sequential")
# The default of `ntm-edge sample` and `ntm-edge run` (and of the samplers they call): both methods
# are exact, and Jacobi is the faster one where it matters, at batch 1 (README "Benchmarks": 10.8x
# on `small`'s near-identity transporter, 3 passes per block instead of 48 decoding steps; 5-6.5x with
# 5-9 passes on `small` transporters that move, README "Does the transporter move?"; about as fast at
# batch 64 on a CPU).
DEFAULT_METHOD = "jacobi"
# Jacobi stops once max|x_new - x| / max|x| <= tol (per example, worst example of the batch).
# 1e-5 is ~100x the float32 rounding floor of one pass, so a converged iteration always gets there;
# on trained tiny and small models it costs 4-5 passes per block and leaves ~3e-7 max abs against
# sequential decoding (1e-4 saves about one pass; errors stay < 1e-5). fp16 needs ~1e-3 (its floor).
DEFAULT_TOL = 1e-5


@dataclass(frozen=True)
class InverseReport:
    """What one inversion used. Index i is the transporter's block i (inversion runs the blocks in
    reverse, the last first); inside a block, segments are in scan order.

    iterations[i][g]: parallel passes spent on segment g of block i (sequential decoding: one
    entry, N - 1 single-token steps). residuals[i][g]: relative change of its last pass,
    max|x_new - x| / max|x| (0.0 for sequential decoding). converged[i][g]: the change fell to
    tol, or the segment ran its exact bound of passes (then it is exact whatever its residual).
    """

    method: str
    iterations: tuple[tuple[int, ...], ...]
    residuals: tuple[tuple[float, ...], ...]
    converged: tuple[tuple[bool, ...], ...]

    @classmethod
    def of_blocks(cls, method: str, per_block: Sequence[tuple]) -> InverseReport:
        """From one (iterations, residuals, converged) triple per block, indexed as the blocks."""
        return cls(method, *(tuple(field) for field in zip(*per_block, strict=True))) if per_block else cls(method, (), (), ())

    @property
    def block_iterations(self) -> tuple[int, ...]:
        """Passes per block, summed over its segments."""
        return tuple(sum(its) for its in self.iterations)

    @property
    def block_residuals(self) -> tuple[float, ...]:
        """Largest final relative change per block, over its segments."""
        return tuple(max(res) for res in self.residuals)

    @property
    def all_converged(self) -> bool:
        return all(all(conv) for conv in self.converged)


def affine_forward(x, mu, alpha):
    """u = (x - mu) exp(-alpha): one TarFlow block, token by token (log|det du/dx| = -sum alpha)."""
    return (x - mu) * namespace(alpha).exp(-alpha)


def affine_inverse(u, mu, alpha):
    """x = mu + exp(alpha) u: the inverse of ``affine_forward`` (fp32 island)."""
    return mu + namespace(alpha).exp(alpha) * u


def segment_bounds(num_tokens: int, segments: int) -> list[tuple[int, int]]:
    """Split tokens 0..N-1 (scan order) into ``segments`` contiguous [start, end) ranges whose
    lengths differ by at most one."""
    cuts = [g * num_tokens // segments for g in range(segments + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def decode_tokens(step, us, caches):
    """Sequential decoding of one block: us (B, N, D) scan order -> x (B, N, D), N - 1 steps.

    step(x_n (B, D), n, caches) -> mu, alpha (B, D) of token n + 1, and the caches with token n
    written; ``caches`` start empty (zeros of their fixed size).
    """
    xp = namespace(us)
    xs = [us[:, 0]]  # token 0 passes through: mu = alpha = 0
    for n in range(us.shape[1] - 1):
        mu, alpha, caches = step(xs[n], n, caches)
        xs.append(affine_inverse(us[:, n + 1], mu, alpha))
    return xp.stack(xs, axis=1)


def solve_segments(step, us, segments: int = 1, tol: float = DEFAULT_TOL, max_iters: int | None = None):
    """(Gauss-Seidel-)Jacobi inverse of one block: us (B, N, D) scan order -> x (B, N, D), and per
    segment: passes used, final relative change, converged (change <= tol or exact bound reached).

    step(x_prefix, u_prefix) (B, e, D) -> the next iterate of the prefix (B, e, D). Segment [s, e)
    is iterated on the prefix x_<e with x_<s frozen, until its relative change is <= tol or after
    max_iters passes (None: no cap); the cap is clipped at the segment's exact bound.
    """
    xp = namespace(us)
    xs = us  # initial guess: exact for token 0 (mu = alpha = 0), and for every token if the block is the identity
    iterations, residuals, converged = [], [], []
    for start, end in segment_bounds(us.shape[1], segments):
        bound = end - start - (start == 0)
        cap = bound if max_iters is None else min(max_iters, bound)
        x_p, u_p = xs[:, :end], us[:, :end]  # (B, e, D): tokens >= e cannot reach this segment
        used, res = 0, 0.0
        while used < cap:
            out = step(x_p, u_p)
            new = xp.concatenate([x_p[:, :start], out[:, start:]], axis=1)  # earlier segments stay frozen
            res = relative_change(new[:, start:], x_p[:, start:])
            x_p, used = new, used + 1
            if res <= tol:
                break
        xs = xp.concatenate([x_p, us[:, end:]], axis=1)  # (B, N, D)
        iterations.append(used)
        residuals.append(res)
        converged.append(res <= tol or used == bound)
    return xs, tuple(iterations), tuple(residuals), tuple(converged)


def inverse_settings(method: str, segments, tol, max_iters, num_blocks: int, num_tokens: int):
    """Validate the inversion settings -> (segments, tol, max_iters), one tuple entry per block.

    Each is one value for every block, or a sequence with one value per block, indexed as the blocks.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown inversion method {method!r}; choose one of: {', '.join(METHODS)}")
    N = num_tokens
    segments, tol, max_iters = (_per_block(v, name, num_blocks) for v, name in
                                ((segments, "segments"), (tol, "tol"), (max_iters, "max_iters")))
    for g in segments:
        if isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= N:
            raise ConfigError(f"segments must be an integer from 1 to the {N} tokens, got {g!r}")
    for v in tol:
        if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"tol must be a finite number >= 0, got {v!r}")
    for m in max_iters:
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ConfigError(f"max_iters must be an integer >= 1 (or None), got {m!r}")
    return segments, tol, max_iters


def _per_block(value, name: str, num_blocks: int) -> tuple:
    """One value for every block, or a sequence with one value per block -> tuple (num_blocks,)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != num_blocks:
            raise ConfigError(f"{name} has {len(value)} values, but the transporter has {num_blocks} blocks")
        return tuple(value)
    return (value,) * num_blocks
