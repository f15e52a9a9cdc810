"""The transporter f_T: a shallow stack of TarFlow blocks, invertible, local to one level (paper 3.1).

One block is a causal transformer over patch tokens whose output is shifted by one token, so the
affine parameters of token n depend on x_<n only (self-exclusive):

    u_n = (x_n - mu(x_<n)) * exp(-alpha(x_<n)),      log|det du/dx| = -sum_n alpha_n

Blocks alternate the scan direction (identity, flip). Each block's output projection starts at
zero, so the transporter starts as the identity; it is the identity at t = 1 by construction (the
pure-noise level is N(0, I) already), through a gate on mu and alpha.

``forward`` (density direction, parallel) and the two exact inverses (sampling direction) live side
by side in each block, each a step function driven by the one driver in ``ntm_edge.decoding``:

- ``inverse``: sequential decoding, N - 1 calls of ``decode_step`` (one token, the KV cache in
  fixed-size tensors: the graph that export traces for the runtime's sequential decoding).
- ``inverse_jacobi``: (Gauss-Seidel-)Jacobi fixed-point decoding (docs/design.md 3a) by ``jacobi_step``
  (one parallel pass, a pure function: the graph that export traces). Exact after at most (segment
  length) passes; the iteration stops earlier once the relative change drops below tol.

``Transporter.inverse`` runs either; ``Transporter.inverse_with_report`` also returns an
``InverseReport`` (passes used and final relative change, per block and segment).

A contextual transporter (``TransporterConfig.context``, issue 13) also reads the step's condition,
the noisier level x_t, when it maps x_s: u_s = f_T(x_s; s, T, x_t). Every block adds a projection of
x_t's patches to its tokens, shifted so that the position that computes token n's affine parameters
sees x_t's patch n (and the patches before it), and the condition vector gets a projection of the
whole x_t. The context is not a flow variable, so the Jacobian in x_s stays triangular and the
log-det is unchanged in form: the likelihood stays exact. The price is on the sampling side: f_T of
level s depends on the x_t it is drawn from, so the sampler inverts f_T at every step (``NTM``).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .config import TransporterConfig
from .decoding import DEFAULT_TOL, InverseReport, affine_forward, affine_inverse, decode_tokens, inverse_settings, solve_segments
from .layers import ConditionMLP, FP32LayerNorm, FP32Linear, TransformerLayer
from .numerics import at_least_fp32, flip_tokens, patchify, unpatchify


def _as_batch(v, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) value -> float tensor of shape (B,) on ``like``'s device."""
    v = torch.as_tensor(v, dtype=torch.float32, device=like.device)
    return v.expand(like.shape[0]) if v.ndim == 0 else v


class TarFlowBlock(nn.Module):
    def __init__(self, token_dim: int, num_tokens: int, cond_dim: int, cfg: TransporterConfig, flip: bool):
        super().__init__()
        self.flip, self.clamp, self.heads = flip, cfg.alpha_clamp, cfg.heads
        self.in_proj = nn.Linear(token_dim, cfg.width)
        self.pos = nn.Parameter(torch.randn(1, num_tokens, cfg.width) * 0.02)
        self.cond = nn.Linear(cond_dim, cfg.width)
        # a contextual transporter: x_t's patch tokens -> this block's width (``context_tokens``)
        self.context = nn.Linear(token_dim, cfg.width) if cfg.context else None
        self.layers = nn.ModuleList(
            TransformerLayer(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers_per_block)
        )
        self.norm = FP32LayerNorm(cfg.width)
        self.out = FP32Linear(cfg.width, 2 * token_dim)
        nn.init.zeros_(self.out.weight)  # every block starts as the identity
        nn.init.zeros_(self.out.bias)

    def scan_order(self, x: torch.Tensor) -> torch.Tensor:
        """Scan order <-> natural order (its own inverse)."""
        return flip_tokens(x) if self.flip else x

    def context_tokens(self, ctx: torch.Tensor | None) -> torch.Tensor | None:
        """x_t's patch tokens (B, N, D), natural order -> (B, N, W) in scan order, shifted by one so that
        position n (which computes token n + 1's parameters) sees x_t's patches 0 .. n + 1; None passes."""
        if ctx is None:
            return None
        assert self.context is not None, "this block reads no context"
        h = self.context(self.scan_order(ctx))
        return F.pad(h[:, 1:], (0, 0, 0, 1))

    def affine(self, h: torch.Tensor, gate: torch.Tensor):
        """Transformer output (B, n, W) -> mu, alpha (B, n, D); alpha soft-clamped, both gated."""
        mu, alpha = at_least_fp32(self.out(self.norm(h))).chunk(2, dim=-1)  # fp32 island
        alpha = self.clamp * torch.tanh(alpha / self.clamp)
        return mu * gate, alpha * gate

    def params(self, xs: torch.Tensor, c: torch.Tensor, gate: torch.Tensor, ctx_h: torch.Tensor | None = None):
        """One parallel pass in scan order: xs (B, n, D), any prefix n <= N of the tokens -> mu,
        alpha (B, n, D) for every token, token k's from x_<k (token 0 gets mu = alpha = 0).
        ctx_h: a contextual block's ``context_tokens`` (B, N, W), or None."""
        h = self.in_proj(xs) + self.pos[:, : xs.shape[1]] + self.cond(c)[:, None]  # (B, n, W)
        if ctx_h is not None:
            h = h + ctx_h[:, : xs.shape[1]]
        for layer in self.layers:
            h = layer(h, causal=True)
        mu, alpha = self.affine(h[:, :-1], gate)  # (B, n-1, D): parameters for tokens 1..n-1
        return F.pad(mu, (0, 0, 1, 0)), F.pad(alpha, (0, 0, 1, 0))  # (B, n, D): token 0 gets zeros

    def forward(self, x: torch.Tensor, c: torch.Tensor, gate: torch.Tensor, ctx: torch.Tensor | None = None):
        """x (B, N, D) natural order (ctx: x_t's tokens, likewise, for a contextual block) -> u (B, N, D),
        logdet (B,)."""
        xs = self.scan_order(x)
        mu, alpha = self.params(xs, c, gate, self.context_tokens(ctx))
        u = affine_forward(xs, mu, alpha)
        return self.scan_order(u), -alpha.sum(dim=(1, 2))

    def decode_step(self, x_token, position, c, gate, k_cache, v_cache, write=None, ctx_h=None):
        """One step of sequential decoding with the KV cache in fixed-size buffers (traced by export as
        ``transporter_step_<i>``, driven N - 1 times by ``inverse``).

        x_token (B, D): token n in scan order; position (1,) int64: n; c (B, W), gate (B, 1, 1);
        k_cache, v_cache: per layer (B, heads, N, hd) (a list, or an (L, ...) tensor), keys/values of
        tokens < n in slots < n (the rest unused); write(cache, new) -> the cache with ``new``
        (B, heads, 1, hd) in slot n: by default a one-hot select (a pure function, for export);
        ``inverse`` writes in place into its own buffers instead, which saves copying the caches;
        ctx_h: a contextual block's ``context_tokens`` (B, N, W) (export traces it from the whole x_t, a graph input)
        -> mu, alpha (B, D): the affine parameters of token n + 1 (x_{n+1} = mu + exp(alpha) u_{n+1}),
           and the per-layer caches (lists) with token n written into slot n. Attention is masked to <= n.
        """
        N = self.pos.shape[1]
        slots = torch.arange(N, device=x_token.device)  # (N,)
        if write is None:
            one_hot = (slots == position).view(1, 1, N, 1)  # the new token's slot
            write = lambda cache, new: torch.where(one_hot, new, cache)  # noqa: E731
        visible = (slots <= position).view(1, 1, 1, N)  # attend to tokens 0..n
        pos = torch.index_select(self.pos[0], 0, position)[None]  # (1, 1, W)
        h = self.in_proj(x_token[:, None]) + pos + self.cond(c)[:, None]  # (B, 1, W)
        if ctx_h is not None:
            h = h + torch.index_select(ctx_h, 1, position)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            h, k, v = layer.decode(h, visible, k_cache[i], v_cache[i], write)  # (B, 1, W), (B, heads, N, hd)
            ks.append(k)
            vs.append(v)
        mu, alpha = self.affine(h, gate)  # (B, 1, D), fp32 island
        return mu[:, 0], alpha[:, 0], ks, vs

    def cache_shape(self, batch: int) -> tuple[int, ...]:
        """(L, B, heads, N, hd) of the decoding caches."""
        return (len(self.layers), batch, self.heads, self.pos.shape[1], self.pos.shape[-1] // self.heads)

    def inverse(self, u: torch.Tensor, c: torch.Tensor, gate: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Sequential exact inverse: u (B, N, D) -> x (B, N, D), one token per ``decode_step``."""
        us = self.scan_order(u)
        ctx_h = self.context_tokens(ctx)
        caches = us.new_zeros(self.cache_shape(us.shape[0])), us.new_zeros(self.cache_shape(us.shape[0]))

        def step(x_token, n, caches):
            position = torch.tensor([n], device=us.device)
            write = lambda cache, new: cache.index_copy_(2, position, new)  # noqa: E731  in place, in our buffers
            mu, alpha, _, _ = self.decode_step(x_token, position, c, gate, *caches, write=write, ctx_h=ctx_h)
            return mu, alpha, caches

        return self.scan_order(decode_tokens(step, us, caches))

    def jacobi_step(self, xs: torch.Tensor, us: torch.Tensor, c: torch.Tensor, gate: torch.Tensor,
                    ctx_h: torch.Tensor | None = None) -> torch.Tensor:
        """One Jacobi pass in scan order, a pure function (export traces it as one graph):
        xs, us (B, n, D), n <= N -> mu(x_<k) + exp(alpha(x_<k)) u_k for every token k (B, n, D).
        The inverse is its fixed point; if tokens < k are exact on input, token k is on output."""
        mu, alpha = self.params(xs, c, gate, ctx_h)  # fp32 (island)
        return affine_inverse(us, mu, alpha).to(us.dtype)

    def inverse_jacobi(self, u: torch.Tensor, c: torch.Tensor, gate: torch.Tensor, segments: int = 1,
                       tol: float = DEFAULT_TOL, max_iters: int | None = None, ctx: torch.Tensor | None = None):
        """(Gauss-Seidel-)Jacobi exact inverse (``decoding.solve_segments``): u (B, N, D) -> x (B, N, D),
        and per segment: passes used, final relative change, converged."""
        ctx_h = self.context_tokens(ctx)
        xs, *report = solve_segments(lambda x, v: self.jacobi_step(x, v, c, gate, ctx_h), self.scan_order(u),
                                     segments, tol, max_iters)
        return (self.scan_order(xs), *report)


class Transporter(nn.Module):
    """f_T(x, t, T): (B, C, H, W) -> (B, C, H, W), with log|det| (B,); a contextual one (``cfg.context``)
    is f_T(x_s; s, T, x_t) and takes the step's x_t (B, C, H, W) as ``context``."""

    def __init__(self, cfg: TransporterConfig, channels: int, image_size: int):
        super().__init__()
        self.cfg, self.channels, self.image_size = cfg, channels, image_size
        p = cfg.patch_size
        token_dim, num_tokens = channels * p * p, (image_size // p) ** 2
        cond_dim = cfg.width
        # with no blocks f_T is the identity (the Gaussian and FM baselines) and has no parameters
        self.condition = ConditionMLP(2, cond_dim) if cfg.num_blocks else None  # (t, 1/T)
        # a contextual transporter's global view of x_t, added to the condition vector
        self.context = nn.Linear(channels * image_size**2, cond_dim) if cfg.context and cfg.num_blocks else None
        self.blocks = nn.ModuleList(
            TarFlowBlock(token_dim, num_tokens, cond_dim, cfg, flip=bool(i % 2)) for i in range(cfg.num_blocks)
        )

    @property
    def contextual(self) -> bool:
        """Whether f_T of a level reads the step's x_t (``TransporterConfig.context``)."""
        return self.context is not None

    def conditioning(self, x: torch.Tensor, t, T, context: torch.Tensor | None = None):
        """(x for its batch and device, t, T, the context x_t of a contextual transporter) -> condition
        vector c (B, W) (with the context's global projection added), gate (B, 1, 1) (0 at t = 1)."""
        assert self.condition is not None, "a transporter without blocks has no condition"
        if (context is None) == self.contextual:
            raise ValueError("a contextual transporter needs the step's x_t as context, and only it takes one")
        t = _as_batch(t, x)
        c = self.condition(t, _as_batch(1.0 / torch.as_tensor(T, dtype=torch.float32), x))  # (B, W)
        gate = (t < 1.0).float()[:, None, None]  # (B, 1, 1): identity at t = 1
        if context is not None:
            assert self.context is not None
            c = c + self.context(context.flatten(1))
        return c, gate

    def _context_tokens(self, context: torch.Tensor | None) -> torch.Tensor | None:
        """x_t (B, C, H, W) -> its patch tokens (B, N, D), which each block projects; None passes."""
        return None if context is None else patchify(context, self.cfg.patch_size)

    def forward(self, x: torch.Tensor, t, T, context: torch.Tensor | None = None):
        """x (B, C, H, W), t (B,) or scalar, T int or (B,) (context: x_t (B, C, H, W) of a contextual
        transporter) -> u (B, C, H, W), logdet (B,)."""
        if not self.blocks:
            return x, x.new_zeros(x.shape[0])
        c, gate = self.conditioning(x, t, T, context)
        ctx = self._context_tokens(context)
        h = patchify(x, self.cfg.patch_size)  # (B, N, D)
        logdet = x.new_zeros(x.shape[0])
        for block in self.blocks:
            h, ld = block(h, c, gate, ctx)
            logdet = logdet + ld
        return unpatchify(h, self.cfg.patch_size, *x.shape[1:]), logdet

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.cfg.patch_size) ** 2

    def block(self, i: int) -> TarFlowBlock:
        """``blocks[i]``, typed."""
        return cast(TarFlowBlock, self.blocks[i])

    def inverse(self, u: torch.Tensor, t, T, method: str = "sequential", segments=1, tol=DEFAULT_TOL,
                max_iters=None, context: torch.Tensor | None = None) -> torch.Tensor:
        """u (B, C, H, W) -> x (B, C, H, W), exact; blocks in reverse order. See ``inverse_with_report``."""
        return self.inverse_with_report(u, t, T, method, segments, tol, max_iters, context)[0]

    def inverse_with_report(self, u: torch.Tensor, t, T, method: str = "sequential", segments=1,
                            tol=DEFAULT_TOL, max_iters=None,
                            context: torch.Tensor | None = None) -> tuple[torch.Tensor, InverseReport]:
        """u (B, C, H, W), t (B,) or scalar, T -> x (B, C, H, W), InverseReport.

        method "sequential": one token per pass (KV cache). "jacobi": fixed-point iteration with
        ``segments`` G (1: plain Jacobi; > 1: Gauss-Seidel-Jacobi), stopping at relative change
        <= ``tol`` or after ``max_iters`` passes per segment (None: the exact bound, segment length).
        ``segments``, ``tol`` and ``max_iters`` are one value for every block, or a sequence with one
        value per block, indexed as ``self.blocks`` (block 0 is inverted last). With max_iters >= N
        (or None) and tol = 0 the result equals sequential decoding up to float rounding. ``context``: the
        x_t of a contextual transporter, as in ``forward``.
        """
        segments, tol, max_iters = inverse_settings(method, segments, tol, max_iters, len(self.blocks),
                                                    self.num_tokens)
        if not self.blocks:
            return u, InverseReport.of_blocks(method, ())
        c, gate = self.conditioning(u, t, T, context)
        ctx = self._context_tokens(context)
        h = patchify(u, self.cfg.patch_size)  # (B, N, D)
        per_block: list = [None] * len(self.blocks)  # (iterations, residuals, converged) of each block
        for i in reversed(range(len(self.blocks))):
            block = self.block(i)
            if method == "sequential":
                h = block.inverse(h, c, gate, ctx)
                per_block[i] = (h.shape[1] - 1,), (0.0,), (True,)
            else:
                h, *per_block[i] = block.inverse_jacobi(h, c, gate, segments[i], tol[i], max_iters[i], ctx)
        return unpatchify(h, self.cfg.patch_size, *u.shape[1:]), InverseReport.of_blocks(method, per_block)
