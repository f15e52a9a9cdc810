"""The transporter f_T: a shallow stack of TarFlow blocks, invertible, local to one level (paper 3.1).

One block is a causal transformer over patch tokens whose output is shifted by one token, so the
affine parameters of token n depend on x_<n only (self-exclusive):

    u_n = (x_n - mu(x_<n)) * exp(-alpha(x_<n)),      log|det du/dx| = -sum_n alpha_n

Blocks alternate the scan direction (identity, flip). Each block's output projection starts at
zero, so the transporter starts as the identity; it is the identity at t = 1 by construction (the
pure-noise level is N(0, I) already), through a gate on mu and alpha.

``forward`` (density direction, parallel) and the two exact inverses (sampling direction) live side
by side in each block:

- ``inverse``: sequential decoding, one token per pass with a KV cache held in explicit tensors
  (N - 1 passes of one token each).
- ``inverse_jacobi``: fixed-point decoding (DESIGN.md 3a; GS-Jacobi, arXiv 2505.12849). The inverse
  is the fixed point of x = mu(x_<n) + exp(alpha(x_<n)) u, and ``jacobi_step`` (one parallel pass,
  a pure function: the graph that export traces) iterates it. The tokens are split into G segments
  solved in scan order (Gauss-Seidel over segments, Jacobi inside each); a segment's pass runs on
  the prefix up to its end only, since causality keeps later tokens out of it. Exact after at most
  (segment length) passes; the iteration stops earlier once the relative change drops below tol.

``Transporter.inverse`` runs either; ``Transporter.inverse_with_report`` also returns an
``InverseReport`` (passes used and final relative change, per block and segment).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import TransporterConfig
from .errors import ConfigError
from .layers import ConditionMLP, FP32LayerNorm, FP32Linear, TransformerLayer, at_least_fp32, patchify, unpatchify

METHODS = ("sequential", "jacobi")
# Jacobi stops once max|x_new - x| / max|x| <= tol (per example, worst example of the batch).
# 1e-5 is ~100x the float32 rounding floor of one pass, so a converged iteration always gets there;
# on trained tiny and small models it costs 4-5 passes per block and leaves ~3e-7 max abs against
# sequential decoding (1e-4 saves about one pass; errors stay < 1e-5). fp16 needs ~1e-3 (its floor).
DEFAULT_TOL = 1e-5


@dataclass(frozen=True)
class InverseReport:
    """What one inversion used. Index i is ``Transporter.blocks[i]`` (inversion runs the blocks in
    reverse, the last first); inside a block, segments are in scan order.

    iterations[i][g]: parallel passes spent on segment g of block i (sequential decoding: one
    entry, N - 1 single-token passes). residuals[i][g]: relative change of its last pass,
    max|x_new - x| / max|x| (0.0 for sequential decoding). converged[i][g]: the change fell to
    tol, or the segment ran its exact bound of passes (then it is exact whatever its residual).
    """

    method: str
    iterations: tuple[tuple[int, ...], ...]
    residuals: tuple[tuple[float, ...], ...]
    converged: tuple[tuple[bool, ...], ...]

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


def _as_batch(v, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) value -> float tensor of shape (B,) on ``like``'s device."""
    v = torch.as_tensor(v, dtype=torch.float32, device=like.device)
    return v.expand(like.shape[0]) if v.ndim == 0 else v


def segment_bounds(num_tokens: int, segments: int) -> list[tuple[int, int]]:
    """Split tokens 0..N-1 (scan order) into ``segments`` contiguous [start, end) ranges whose
    lengths differ by at most one."""
    cuts = [g * num_tokens // segments for g in range(segments + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def relative_change(new: torch.Tensor, old: torch.Tensor, eps: float = 1e-12) -> float:
    """max|new - old| / max|new| per example (B, ...), worst example of the batch (fp32 island)."""
    new, old = at_least_fp32(new).flatten(1), at_least_fp32(old).flatten(1)
    return ((new - old).abs().amax(1) / (new.abs().amax(1) + eps)).max().item()


class TarFlowBlock(nn.Module):
    def __init__(self, token_dim: int, num_tokens: int, cond_dim: int, cfg: TransporterConfig, flip: bool):
        super().__init__()
        self.flip, self.clamp = flip, cfg.alpha_clamp
        self.in_proj = nn.Linear(token_dim, cfg.width)
        self.pos = nn.Parameter(torch.randn(1, num_tokens, cfg.width) * 0.02)
        self.cond = nn.Linear(cond_dim, cfg.width)
        self.layers = nn.ModuleList(
            TransformerLayer(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers_per_block)
        )
        self.norm = FP32LayerNorm(cfg.width)
        self.out = FP32Linear(cfg.width, 2 * token_dim)
        nn.init.zeros_(self.out.weight)  # every block starts as the identity
        nn.init.zeros_(self.out.bias)

    def scan_order(self, x: torch.Tensor) -> torch.Tensor:
        """Scan order <-> natural order (its own inverse)."""
        return x.flip(1) if self.flip else x

    def affine(self, h: torch.Tensor, gate: torch.Tensor):
        """Transformer output (B, n, W) -> mu, alpha (B, n, D); alpha soft-clamped, both gated."""
        mu, alpha = at_least_fp32(self.out(self.norm(h))).chunk(2, dim=-1)  # fp32 island
        alpha = self.clamp * torch.tanh(alpha / self.clamp)
        return mu * gate, alpha * gate

    def params(self, xs: torch.Tensor, c: torch.Tensor, gate: torch.Tensor):
        """One parallel pass in scan order: xs (B, n, D), any prefix n <= N of the tokens -> mu,
        alpha (B, n, D) for every token, token k's from x_<k (token 0 gets mu = alpha = 0)."""
        h = self.in_proj(xs) + self.pos[:, : xs.shape[1]] + self.cond(c)[:, None]  # (B, n, W)
        for layer in self.layers:
            h = layer(h, causal=True)
        mu, alpha = self.affine(h[:, :-1], gate)  # (B, n-1, D): parameters for tokens 1..n-1
        return F.pad(mu, (0, 0, 1, 0)), F.pad(alpha, (0, 0, 1, 0))  # (B, n, D): token 0 gets zeros

    def forward(self, x: torch.Tensor, c: torch.Tensor, gate: torch.Tensor):
        """x (B, N, D) natural order -> u (B, N, D), logdet (B,)."""
        xs = self.scan_order(x)
        mu, alpha = self.params(xs, c, gate)
        u = (xs - mu) * torch.exp(-alpha)
        return self.scan_order(u), -alpha.sum(dim=(1, 2))

    def inverse(self, u: torch.Tensor, c: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Sequential exact inverse: u (B, N, D) -> x (B, N, D), one token per step, KV cache in
        explicit tensors (one (k, v) pair per layer, grown by concatenation)."""
        us = self.scan_order(u)
        B, N, _ = us.shape
        heads = self.layers[0].attn.heads
        hd = self.pos.shape[-1] // heads
        caches = [(us.new_zeros(B, heads, 0, hd), us.new_zeros(B, heads, 0, hd)) for _ in self.layers]
        cond = self.cond(c)[:, None]  # (B, 1, W)
        xs = [us[:, 0]]  # token 0 passes through: mu = alpha = 0
        for n in range(N - 1):
            h = self.in_proj(xs[n][:, None]) + self.pos[:, n : n + 1] + cond  # (B, 1, W)
            new_caches = []
            for layer, (k, v) in zip(self.layers, caches, strict=True):
                h, k, v = layer.step(h, k, v)
                new_caches.append((k, v))
            caches = new_caches
            mu, alpha = self.affine(h, gate)  # (B, 1, D): parameters of token n + 1
            xs.append(us[:, n + 1] * torch.exp(alpha[:, 0]) + mu[:, 0])
        return self.scan_order(torch.stack(xs, dim=1))

    def jacobi_step(self, xs: torch.Tensor, us: torch.Tensor, c: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """One Jacobi pass in scan order, a pure function (export traces it as one graph):
        xs, us (B, n, D), n <= N -> mu(x_<k) + exp(alpha(x_<k)) u_k for every token k (B, n, D).
        The inverse is its fixed point; if tokens < k are exact on input, token k is on output."""
        mu, alpha = self.params(xs, c, gate)  # fp32 (island)
        return (mu + torch.exp(alpha) * us).to(us.dtype)

    def inverse_jacobi(self, u: torch.Tensor, c: torch.Tensor, gate: torch.Tensor, segments: int = 1,
                       tol: float = DEFAULT_TOL, max_iters: int | None = None):
        """(Gauss-Seidel-)Jacobi exact inverse: u (B, N, D) -> x (B, N, D), and per segment: passes
        used, final relative change, converged (change <= tol or exact bound reached).

        Segments are solved in scan order; segment [s, e) is iterated on the prefix x_<e with
        x_<s frozen, until its relative change is <= tol or after max_iters passes (None: no cap).
        Pass k makes tokens s .. s+k-1 exact (token 0 is exact from the start, x_0 = u_0), so a
        segment never needs more than e - s passes (e - 1 for the first): the cap is clipped there.
        """
        us = self.scan_order(u)
        N = us.shape[1]
        xs = us  # initial guess: exact for token 0 (mu = alpha = 0), and for every token if the block is the identity
        iterations, residuals, converged = [], [], []
        for start, end in segment_bounds(N, segments):
            bound = end - start - (start == 0)
            cap = bound if max_iters is None else min(max_iters, bound)
            x_p, u_p = xs[:, :end], us[:, :end]  # (B, e, D): tokens >= e cannot reach this segment
            used, res = 0, 0.0
            while used < cap:
                step = self.jacobi_step(x_p, u_p, c, gate)
                new = torch.cat([x_p[:, :start], step[:, start:]], dim=1)  # earlier segments stay frozen
                res = relative_change(new[:, start:], x_p[:, start:])
                x_p, used = new, used + 1
                if res <= tol:
                    break
            xs = torch.cat([x_p, us[:, end:]], dim=1)  # (B, N, D)
            iterations.append(used)
            residuals.append(res)
            converged.append(res <= tol or used == bound)
        return self.scan_order(xs), tuple(iterations), tuple(residuals), tuple(converged)


class Transporter(nn.Module):
    """f_T(x, t, T): (B, C, H, W) -> (B, C, H, W), with log|det| (B,)."""

    def __init__(self, cfg: TransporterConfig, channels: int, image_size: int):
        super().__init__()
        self.cfg, self.channels, self.image_size = cfg, channels, image_size
        p = cfg.patch_size
        token_dim, num_tokens = channels * p * p, (image_size // p) ** 2
        cond_dim = cfg.width
        # with no blocks f_T is the identity (the Gaussian and FM baselines) and has no parameters
        self.condition = ConditionMLP(2, cond_dim) if cfg.num_blocks else None  # (t, 1/T)
        self.blocks = nn.ModuleList(
            TarFlowBlock(token_dim, num_tokens, cond_dim, cfg, flip=bool(i % 2)) for i in range(cfg.num_blocks)
        )

    def conditioning(self, x: torch.Tensor, t, T):
        """(x for its batch and device, t, T) -> condition vector c (B, W), gate (B, 1, 1) (0 at t = 1)."""
        t = _as_batch(t, x)
        c = self.condition(t, _as_batch(1.0 / torch.as_tensor(T, dtype=torch.float32), x))  # (B, W)
        gate = (t < 1.0).float()[:, None, None]  # (B, 1, 1): identity at t = 1
        return c, gate

    def forward(self, x: torch.Tensor, t, T):
        """x (B, C, H, W), t (B,) or scalar, T int or (B,) -> u (B, C, H, W), logdet (B,)."""
        if not self.blocks:
            return x, x.new_zeros(x.shape[0])
        c, gate = self.conditioning(x, t, T)
        h = patchify(x, self.cfg.patch_size)  # (B, N, D)
        logdet = x.new_zeros(x.shape[0])
        for block in self.blocks:
            h, ld = block(h, c, gate)
            logdet = logdet + ld
        return unpatchify(h, self.cfg.patch_size, *x.shape[1:]), logdet

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.cfg.patch_size) ** 2

    def inverse(self, u: torch.Tensor, t, T, method: str = "sequential", segments=1, tol=DEFAULT_TOL,
                max_iters=None) -> torch.Tensor:
        """u (B, C, H, W) -> x (B, C, H, W), exact; blocks in reverse order. See ``inverse_with_report``."""
        return self.inverse_with_report(u, t, T, method, segments, tol, max_iters)[0]

    def inverse_with_report(self, u: torch.Tensor, t, T, method: str = "sequential", segments=1,
                            tol=DEFAULT_TOL, max_iters=None) -> tuple[torch.Tensor, InverseReport]:
        """u (B, C, H, W), t (B,) or scalar, T -> x (B, C, H, W), InverseReport.

        method "sequential": one token per pass (KV cache). "jacobi": fixed-point iteration with
        ``segments`` G (1: plain Jacobi; > 1: Gauss-Seidel-Jacobi), stopping at relative change
        <= ``tol`` or after ``max_iters`` passes per segment (None: the exact bound, segment length).
        ``segments``, ``tol`` and ``max_iters`` are one value for every block, or a sequence with one
        value per block, indexed as ``self.blocks`` (block 0 is inverted last). With max_iters >= N
        (or None) and tol = 0 the result equals sequential decoding up to float rounding.
        """
        segments, tol, max_iters = self._inverse_settings(method, segments, tol, max_iters)
        if not self.blocks:
            return u, InverseReport(method, (), (), ())
        c, gate = self.conditioning(u, t, T)
        h = patchify(u, self.cfg.patch_size)  # (B, N, D)
        per_block = [None] * len(self.blocks)  # (iterations, residuals, converged) of each block
        for i in reversed(range(len(self.blocks))):
            block = self.blocks[i]
            if method == "sequential":
                h = block.inverse(h, c, gate)
                per_block[i] = (h.shape[1] - 1,), (0.0,), (True,)
            else:
                h, *per_block[i] = block.inverse_jacobi(h, c, gate, segments[i], tol[i], max_iters[i])
        report = InverseReport(method, *(tuple(field) for field in zip(*per_block, strict=True)))
        return unpatchify(h, self.cfg.patch_size, *u.shape[1:]), report  # (B, C, H, W)

    def _inverse_settings(self, method, segments, tol, max_iters):
        """Validate the inversion settings -> (segments, tol, max_iters), one tuple entry per block."""
        if method not in METHODS:
            raise ConfigError(f"unknown inversion method {method!r}; choose one of: {', '.join(METHODS)}")
        L, N = len(self.blocks), self.num_tokens
        segments, tol, max_iters = (_per_block(v, name, L) for v, name in
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
