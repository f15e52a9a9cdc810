"""The predictor f_P: a Gaussian over u_s given u_t (paper 3.2, docs/design.md 2).

The backbone knows nothing about the schedule. It maps (u_t, t, s, T, prompt) to a raw output
(velocity v or x0-hat) and a log-scale residual d; ``Predictor`` turns that into the posterior
parametrisation of Prop. 2:

    x0-hat = u_t - t v   (or the raw output),   mu_P = A u_t + B x0-hat,   sigma_P = C exp(d)

with d's projection zero-initialised, so a fresh model's step is the Gaussian posterior step.
Two backbones share one interface: a conv U-Net over the image (pixels on CPUs) and a transformer
over patch tokens with the prompt as prefix tokens (the paper's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import schedule
from .config import PredictorConfig
from .layers import ConditionMLP, FP32Conv2d, FP32GroupNorm, FP32LayerNorm, FP32Linear, TransformerLayer
from .numerics import at_least_fp32, patchify, unpatchify

LOG_SCALE_CLAMP = 8.0  # |d| <= 8 (soft): sigma_P within C e^{+-8}


def _groups(ch: int) -> int:
    return 8 if ch % 8 == 0 else 1


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a FiLM (scale, shift) from the condition vector."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int):
        super().__init__()
        self.norm1 = FP32GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * c_out)
        self.norm2 = FP32GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, c):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(c)[:, :, None, None].chunk(2, dim=1)  # (B, c_out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class UNetBackbone(nn.Module):
    """Conv U-Net over (B, C, H, W); the prompt enters as its masked-mean embedding in the condition."""

    def __init__(self, cfg: PredictorConfig, channels: int, prompt_dim: int):
        super().__init__()
        ch, cond_dim = cfg.channels, 4 * cfg.channels[0]
        self.condition = ConditionMLP(3 if cfg.grid_conditioning else 1, cond_dim)  # (t, s, 1/T) or (t,)
        self.prompt_proj = nn.Linear(prompt_dim, cond_dim)
        self.stem = nn.Conv2d(channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips, c_prev = [], ch[0]
        for i, c in enumerate(ch):
            for _ in range(cfg.blocks_per_level):
                self.down.append(ResBlock(c_prev, c, cond_dim))
                skips.append(c)
                c_prev = c
            if i < len(ch) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = ResBlock(c_prev, c_prev, cond_dim)
        self.up = nn.ModuleList()
        for i, c in reversed(list(enumerate(ch))):
            for _ in range(cfg.blocks_per_level):
                self.up.append(ResBlock(c_prev + skips.pop(), c, cond_dim))
                c_prev = c
            if i > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out_norm = FP32GroupNorm(_groups(c_prev), c_prev)
        self.out = FP32Conv2d(c_prev, 2 * channels, 3, padding=1)
        for p in self.out.parameters():  # weight and bias: raw output 0 and d = 0 at start
            nn.init.zeros_(p)

    def forward(self, u_t, times, prompt_emb, prompt_mask):
        """u_t (B, C, H, W); times: (t, s, 1/T) or (t,), each (B,); prompt_emb (B, P, E), mask (B, P)
        -> raw, d (B, C, H, W)."""
        m = prompt_mask.float()[..., None]  # (B, P, 1)
        pooled = (prompt_emb * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, E)
        c = self.condition(*times) + self.prompt_proj(pooled)  # (B, cond)
        h, hs = self.stem(u_t), []
        for layer in self.down:
            if isinstance(layer, ResBlock):
                h = layer(h, c)
                hs.append(h)
            else:
                h = layer(h)
        h = self.mid(h, c)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), c) if isinstance(layer, ResBlock) else layer(h)
        return self.out(F.silu(self.out_norm(h))).chunk(2, dim=1)


class TransformerBackbone(nn.Module):
    """Non-causal transformer over [condition token, prompt tokens..., spatial tokens]."""

    def __init__(self, cfg: PredictorConfig, channels: int, image_size: int, prompt_dim: int):
        super().__init__()
        p, W = cfg.patch_size, cfg.width
        self.p, self.channels, self.image_size = p, channels, image_size
        self.in_proj = nn.Linear(channels * p * p, W)
        self.pos = nn.Parameter(torch.randn(1, (image_size // p) ** 2, W) * 0.02)
        self.condition = ConditionMLP(3 if cfg.grid_conditioning else 1, W)
        self.prompt_proj = nn.Linear(prompt_dim, W)
        self.layers = nn.ModuleList(TransformerLayer(W, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = FP32LayerNorm(W)
        self.out = FP32Linear(W, 2 * channels * p * p)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, u_t, times, prompt_emb, prompt_mask):
        B = u_t.shape[0]
        c = self.condition(*times)  # (B, W)
        x = self.in_proj(patchify(u_t, self.p)) + self.pos + c[:, None]  # (B, N, W)
        prefix = torch.cat([c[:, None], self.prompt_proj(prompt_emb)], dim=1)  # (B, 1 + P, W)
        h = torch.cat([prefix, x], dim=1)  # (B, 1 + P + N, W)
        ones = prompt_mask.new_ones(B, 1 + x.shape[1])
        key_mask = torch.cat([ones[:, :1], prompt_mask, ones[:, 1:]], dim=1)  # (B, 1 + P + N)
        for layer in self.layers:
            h = layer(h, key_mask=key_mask)
        out = self.out(self.norm(h[:, prefix.shape[1] :]))  # (B, N, 2 C p p)
        raw, d = out.chunk(2, dim=-1)
        size = (self.channels, self.image_size, self.image_size)
        return unpatchify(raw, self.p, *size), unpatchify(d, self.p, *size)


class Predictor(nn.Module):
    def __init__(self, cfg: PredictorConfig, channels: int, image_size: int, prompt_dim: int):
        super().__init__()
        self.param, self.grid_conditioning, self.learn_scale = cfg.param, cfg.grid_conditioning, cfg.learn_scale
        self.backbone: nn.Module
        if cfg.backbone == "unet":
            self.backbone = UNetBackbone(cfg, channels, prompt_dim)
        else:
            self.backbone = TransformerBackbone(cfg, channels, image_size, prompt_dim)

    def forward(self, u_t, t, s, T, prompt_emb, prompt_mask):
        """u_t (B, C, H, W); t, s (B,); T (B,) -> mu, log_sigma, x0_hat, each (B, C, H, W).

        log_sigma = log C + d is returned rather than sigma so the NLL stays finite and exact in
        fp32 (an fp32 island); sigma = exp(log_sigma), which is 0 at s = 0.
        """
        raw, d = self.backbone(u_t, (t, s, 1.0 / T) if self.grid_conditioning else (t,), prompt_emb, prompt_mask)
        view = (-1, 1, 1, 1)
        t4, s4 = t.view(view), s.view(view)
        x0_hat = schedule.x0_from_velocity(u_t, t4, raw) if self.param == "v" else raw
        A, B, C = schedule.posterior_coeffs(s4, t4)
        mu = A * u_t + B * x0_hat
        log_C = torch.log(C).expand_as(mu)
        if not self.learn_scale:
            return mu, log_C, x0_hat
        d = LOG_SCALE_CLAMP * torch.tanh(at_least_fp32(d) / LOG_SCALE_CLAMP)  # fp32 island
        return mu, log_C + d, x0_hat

    def velocity(self, x_t, t, prompt_emb, prompt_mask):
        """The raw output read as a flow-matching velocity v(x_t, t) (objective "fm"): (B, C, H, W)."""
        return self.backbone(x_t, (t,), prompt_emb, prompt_mask)[0]
