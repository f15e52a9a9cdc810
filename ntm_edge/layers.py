"""Shared torch primitives: Fourier condition features, attention, and a transformer layer with a
decoding step over an explicit fixed-size KV cache. (Patch tokens and the fp32-island upcast are
plain arithmetic: ``ntm_edge.numerics``.)

Every module here is a pure function of its inputs: caches are tensors passed in and returned,
never state on the module (TarFlow's list caches and mode flags do not export to ONNX), and the
cache keeps its size (attention masked to the slots written so far; the write into the new token's
slot is a function the caller passes: a one-hot select in an exported graph, in place in a loop).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .numerics import at_least_fp32


class FP32Island:
    """Marker of a module that computes in fp32 whatever the input dtype and under autocast (an fp32
    island, listed in ``ntm_edge.islands``). Norms return the input dtype; projections return fp32."""


def _fp32(p: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter upcast to fp32 (no-op on fp32 weights, the autocast case; a copy after ``.half()``)."""
    return None if p is None else at_least_fp32(p)


class FP32LayerNorm(nn.LayerNorm, FP32Island):
    """nn.LayerNorm computed in fp32, returned in the input dtype (``nn.LayerNorm`` runs in the input dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            y = F.layer_norm(at_least_fp32(x), self.normalized_shape, _fp32(self.weight), _fp32(self.bias), self.eps)
        return y.to(x.dtype)


class FP32GroupNorm(nn.GroupNorm, FP32Island):
    """nn.GroupNorm computed in fp32, returned in the input dtype. Over (B, C, H W): the exported graph then
    reshapes with constant shapes (-1 for the batch) instead of reading the shape of the input, whose
    only other reader is the int8 convolution in front of it (a second reader stops onnxruntime from
    fusing that convolution in the unrolled sampler graph)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        with torch.autocast(x.device.type, enabled=False):
            h = at_least_fp32(x).reshape(-1, C, H * W)  # (B, C, HW)
            y = F.group_norm(h, self.num_groups, _fp32(self.weight), _fp32(self.bias), self.eps)
        return y.reshape(-1, C, H, W).to(x.dtype)


class FP32Linear(nn.Linear, FP32Island):
    """A last projection in fp32: (..., in) -> (..., out) float32 (at least), also under autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(at_least_fp32(x), at_least_fp32(self.weight), _fp32(self.bias))


class FP32Conv2d(nn.Conv2d, FP32Island):
    """A last projection in fp32: (B, C_in, H, W) -> (B, C_out, H, W) float32 (at least), also under autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self._conv_forward(at_least_fp32(x), at_least_fp32(self.weight), _fp32(self.bias))


def fourier_features(x: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of scalars in [0, 1]: (B,) -> (B, dim). Scaled by 1000 as in DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = 1000.0 * x.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ConditionMLP(nn.Module, FP32Island):
    """Fourier features of several scalars (t, s, 1/T, ...) -> one condition vector (B, out_dim).
    The time/level embedding is an fp32 island: it runs in fp32 under autocast."""

    def __init__(self, num_scalars: int, out_dim: int, feat_dim: int = 64):
        super().__init__()
        self.feat_dim = feat_dim
        self.net = nn.Sequential(
            nn.Linear(num_scalars * feat_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim)
        )

    def forward(self, *scalars: torch.Tensor) -> torch.Tensor:
        feats = torch.cat([fourier_features(s, self.feat_dim) for s in scalars], dim=-1)  # (B, n*F)
        with torch.autocast(feats.device.type, enabled=False):
            return self.net(feats.to(next(self.net.parameters()).dtype))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def split_heads(self, h: torch.Tensor):
        B, N, W = h.shape
        q, k, v = self.qkv(h).reshape(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v  # each (B, heads, N, hd)

    def merge_heads(self, o: torch.Tensor) -> torch.Tensor:
        B, Hh, N, hd = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, N, Hh * hd))  # (B, N, W)

    def forward(self, h: torch.Tensor, causal: bool = False, key_mask: torch.Tensor | None = None):
        """h (B, N, W); key_mask (B, N) bool, True = attend. -> (B, N, W)."""
        q, k, v = self.split_heads(h)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, N)
        return self.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal))

    def decode(self, h: torch.Tensor, visible: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, write):
        """One new token attending to the tokens before it and itself, with a fixed-size cache.

        h (B, 1, W); visible (1, 1, 1, N) bool, the slots up to the new token's; caches (B, heads, N, hd);
        write(cache, new (B, heads, 1, hd)) -> the cache with ``new`` in the token's slot
        -> out (B, 1, W), and the caches with the new token's key and value written.
        """
        q, k, v = self.split_heads(h)  # (B, heads, 1, hd) each
        k_cache, v_cache = write(k_cache, k), write(v_cache, v)  # (B, heads, N, hd)
        return self.merge_heads(F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=visible)), k_cache, v_cache


class TransformerLayer(nn.Module):
    """Pre-norm attention + MLP. LayerNorm runs in fp32 (an fp32 island, ``FP32LayerNorm``)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = FP32LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = FP32LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, h, causal: bool = False, key_mask=None):
        h = h + self.attn(self.norm1(h), causal=causal, key_mask=key_mask)
        return h + self.mlp(self.norm2(h))

    def decode(self, h, visible, k_cache, v_cache, write):
        """The layer for one new token with a fixed-size KV cache (``Attention.decode``)."""
        a, k_cache, v_cache = self.attn.decode(self.norm1(h), visible, k_cache, v_cache, write)
        h = h + a
        return h + self.mlp(self.norm2(h)), k_cache, v_cache
