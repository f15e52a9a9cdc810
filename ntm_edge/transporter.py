"""The transporter f_T: a shallow stack of TarFlow blocks, invertible, local to one level (paper 3.1).

One block is a causal transformer over patch tokens whose output is shifted by one token, so the
affine parameters of token n depend on x_<n only (self-exclusive):

    u_n = (x_n - mu(x_<n)) * exp(-alpha(x_<n)),      log|det du/dx| = -sum_n alpha_n

Blocks alternate the scan direction (identity, flip). Each block's output projection starts at
zero, so the transporter starts as the identity; it is the identity at t = 1 by construction (the
pure-noise level is N(0, I) already), through a gate on mu and alpha.

``forward`` (density direction, parallel) and ``inverse`` (sampling direction, sequential with a
KV cache held in explicit tensors) live side by side in each block.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TransporterConfig
from .layers import ConditionMLP, TransformerLayer, at_least_fp32, patchify, unpatchify


def _as_batch(v, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) value -> float tensor of shape (B,) on ``like``'s device."""
    v = torch.as_tensor(v, dtype=torch.float32, device=like.device)
    return v.expand(like.shape[0]) if v.ndim == 0 else v


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
        self.norm = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, 2 * token_dim)
        nn.init.zeros_(self.out.weight)  # every block starts as the identity
        nn.init.zeros_(self.out.bias)

    def _order(self, x: torch.Tensor) -> torch.Tensor:
        """Scan order <-> natural order (its own inverse)."""
        return x.flip(1) if self.flip else x

    def _affine(self, h: torch.Tensor, gate: torch.Tensor):
        """Transformer output (B, n, W) -> mu, alpha (B, n, D); alpha soft-clamped, both gated."""
        mu, alpha = at_least_fp32(self.out(self.norm(h))).chunk(2, dim=-1)  # fp32 island
        alpha = self.clamp * torch.tanh(alpha / self.clamp)
        return mu * gate, alpha * gate

    def params(self, xs: torch.Tensor, c: torch.Tensor, gate: torch.Tensor):
        """One parallel pass in scan order: xs (B, N, D) -> mu, alpha (B, N, D) for every token,
        token n's from x_<n (token 0 gets mu = alpha = 0). Jacobi decoding iterates this pass."""
        h = self.in_proj(xs) + self.pos + self.cond(c)[:, None]  # (B, N, W)
        for layer in self.layers:
            h = layer(h, causal=True)
        mu, alpha = self._affine(h[:, :-1], gate)  # (B, N-1, D): parameters for tokens 1..N-1
        zero = torch.zeros_like(mu[:, :1])
        return torch.cat([zero, mu], dim=1), torch.cat([zero, alpha], dim=1)

    def forward(self, x: torch.Tensor, c: torch.Tensor, gate: torch.Tensor):
        """x (B, N, D) natural order -> u (B, N, D), logdet (B,)."""
        xs = self._order(x)
        mu, alpha = self.params(xs, c, gate)
        u = (xs - mu) * torch.exp(-alpha)
        return self._order(u), -alpha.sum(dim=(1, 2))

    def inverse(self, u: torch.Tensor, c: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Sequential exact inverse: u (B, N, D) -> x (B, N, D), one token per step, KV cache in
        explicit tensors (one (k, v) pair per layer, grown by concatenation)."""
        us = self._order(u)
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
            mu, alpha = self._affine(h, gate)  # (B, 1, D): parameters of token n + 1
            xs.append(us[:, n + 1] * torch.exp(alpha[:, 0]) + mu[:, 0])
        return self._order(torch.stack(xs, dim=1))


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

    def _setup(self, x: torch.Tensor, t, T):
        t = _as_batch(t, x)
        c = self.condition(t, _as_batch(1.0 / torch.as_tensor(T, dtype=torch.float32), x))  # (B, W)
        gate = (t < 1.0).float()[:, None, None]  # (B, 1, 1): identity at t = 1
        return c, gate

    def forward(self, x: torch.Tensor, t, T):
        """x (B, C, H, W), t (B,) or scalar, T int or (B,) -> u (B, C, H, W), logdet (B,)."""
        if not self.blocks:
            return x, x.new_zeros(x.shape[0])
        c, gate = self._setup(x, t, T)
        h = patchify(x, self.cfg.patch_size)  # (B, N, D)
        logdet = x.new_zeros(x.shape[0])
        for block in self.blocks:
            h, ld = block(h, c, gate)
            logdet = logdet + ld
        return unpatchify(h, self.cfg.patch_size, *x.shape[1:]), logdet

    def inverse(self, u: torch.Tensor, t, T) -> torch.Tensor:
        """u (B, C, H, W) -> x (B, C, H, W): exact sequential decoding, blocks in reverse order."""
        if not self.blocks:
            return u
        c, gate = self._setup(u, t, T)
        h = patchify(u, self.cfg.patch_size)
        for block in reversed(self.blocks):
            h = block.inverse(h, c, gate)
        return unpatchify(h, self.cfg.patch_size, *u.shape[1:])
