"""The Normalizing Trajectory Model: transporter + predictor + prompt encoder, its exact trajectory
likelihood (paper 3.4), and the four-step sampler (Algorithm 2).

One reverse step p(x_s | x_t) is a normalizing flow:

    u = f_T(x, t, T),   u_s ~ N(mu_P(u_t), sigma_P^2),
    -log p(x_s | x_t) = -log N(f_T(x_s); mu_P, sigma_P^2) - log|det df_T/dx_s|

and the trajectory's NLL is the sum over the T steps plus -log N(x_1; 0, I) for the pure-noise top.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import schedule
from .config import NTMConfig
from .layers import at_least_fp32
from .predictor import Predictor
from .prompts import NULL_ID, LabelVocab
from .transporter import Transporter

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class Trajectory:
    """Levels x_t0 .. x_tT of B examples: x (B, K, C, H, W), t (B, K), K = T + 1, t[:, -1] = 1."""

    x: torch.Tensor
    t: torch.Tensor

    @property
    def steps(self) -> int:
        return self.x.shape[1] - 1


def gaussian_nll(x: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """-log N(x; mu, sigma^2), summed over all but the first axis: (B, ...) -> (B,). fp32 island."""
    x, mu, log_sigma = at_least_fp32(x), at_least_fp32(mu), at_least_fp32(log_sigma)
    z = (x - mu) * torch.exp(-log_sigma)
    return (0.5 * z * z + log_sigma + HALF_LOG_2PI).flatten(1).sum(1)


def guided_gaussian(mu_c, ls_c, mu_u, ls_u, w: float):
    """Classifier-free guidance on a Gaussian (paper C.5, as STARFlow); w = 0 is the conditional.

    r = min(sigma_c / sigma_u, 1)^2,  sigma = sigma_c / sqrt(1 + w - w r),
    mu = ((1 + w) mu_c - w r mu_u) / (1 + w - w r).   Log-scales in, log-scale out.
    """
    r = torch.exp(2.0 * torch.clamp(ls_c - ls_u, max=0.0))
    denom = 1.0 + w - w * r
    return ((1.0 + w) * mu_c - w * r * mu_u) / denom, ls_c - 0.5 * torch.log(denom)


class LabelEncoder(nn.Module):
    """Prompt ids (B, P) -> embeddings (B, P, E); row 0 is the null (unconditional) prompt."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)


class NTM(nn.Module):
    def __init__(self, config: NTMConfig):
        super().__init__()
        self.config = config.validate()
        self.vocab = LabelVocab(config.prompt.class_names)
        self.prompt_encoder = LabelEncoder(self.vocab.num_tokens, config.prompt.dim)
        self.transporter = Transporter(config.transporter, config.channels, config.image_size)
        self.predictor = Predictor(config.predictor, config.channels, config.image_size, config.prompt.dim)

    # -- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device: str = "cpu") -> NTM:
        from .checkpoint import load_model

        return load_model(path, device=device)

    def save_pretrained(self, path) -> None:
        from .checkpoint import save_model

        save_model(self, path)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- prompts ----------------------------------------------------------------------------------

    def tokenize(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (list of str) or ids (B, P) -> ids (B, P), mask (B, P) on the model's device."""
        if isinstance(prompts, torch.Tensor):
            ids = prompts.to(self.device).long()
            return ids, torch.ones_like(ids, dtype=torch.bool)
        ids, mask = self.vocab.tokenize(list(prompts))
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)

    # -- trajectories and their likelihood --------------------------------------------------------

    def forward_trajectory(self, x0: torch.Tensor, steps: int | None = None, generator=None, t_min=None):
        """Markov forward process (2.3) from x0 (B, C, H, W) -> Trajectory with K = steps + 1 levels.

        t_min: float or (B,) tensor for the cleanest level (default ``config.t_min_sample``).
        """
        steps = steps or self.config.steps
        B = x0.shape[0]
        t_min = self.config.t_min_sample if t_min is None else t_min
        t_min = torch.as_tensor(t_min, dtype=torch.float32, device=x0.device).expand(B)
        upper = torch.as_tensor(schedule.time_grid(steps, 0.0, self.config.shift)[1:], dtype=torch.float32)
        ts = torch.cat([t_min[:, None], upper.to(x0.device).expand(B, steps)], dim=1)  # (B, K)

        def noise():
            return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)

        view = (B, 1, 1, 1)
        mean, std = schedule.marginal_coeffs(ts[:, 0].view(view))
        x = mean * x0 + std * noise()
        levels = [x]
        for k in range(1, steps + 1):
            a, b = schedule.markov_coeffs(ts[:, k - 1].view(view), ts[:, k].view(view))
            x = a * x + b * noise()
            levels.append(x)
        return Trajectory(torch.stack(levels, dim=1), ts)

    def step_terms(self, u_s, logdet_s, u_t, s, t, T, ids, mask):
        """Exact -log p(x_s | x_t) of one step per example (B,), with the predictor's mean and x0-hat.

        u_s, u_t (B, C, H, W) = f_T of x_s, x_t; logdet_s (B,); s, t, T (B,); ids, mask (B, P)
        -> nll (B,), mu (B, C, H, W), x0_hat (B, C, H, W).
        """
        mu, log_sigma, x0_hat = self.predictor(u_t, t, s, T, self.prompt_encoder(ids), mask)
        return gaussian_nll(u_s, mu, log_sigma) - logdet_s, mu, x0_hat

    def trajectory_terms(self, traj: Trajectory, ids, mask):
        """All T steps of each example in one parallel pass (end-to-end mode).

        -> nll (B,) in nats; mu, x0_hat (B, T, C, H, W) for steps k = 1..T (predicting level k - 1).
        """
        B, K = traj.t.shape
        T = K - 1
        shape = traj.x.shape[2:]
        u, logdet = self.transporter(traj.x.reshape(B * K, *shape), traj.t.reshape(B * K), T)
        u, logdet = u.reshape(B, K, *shape), logdet.reshape(B, K)
        rep = lambda v: v.repeat_interleave(T, dim=0)  # noqa: E731  (B, ...) -> (B*T, ...)
        step_nll, mu, x0_hat = self.step_terms(
            u[:, :-1].reshape(B * T, *shape),
            logdet[:, :-1].reshape(B * T),
            u[:, 1:].reshape(B * T, *shape),
            traj.t[:, :-1].reshape(B * T),
            traj.t[:, 1:].reshape(B * T),
            torch.full((B * T,), float(T), device=u.device),
            rep(ids),
            rep(mask),
        )
        # the top level t_T = 1 is N(0, I), and f_T is the identity there (logdet[:, -1] = 0)
        prior = gaussian_nll(u[:, -1], torch.zeros_like(u[:, -1]), torch.zeros_like(u[:, -1]))
        nll = prior - logdet[:, -1] + step_nll.reshape(B, T).sum(1)
        return nll, mu.reshape(B, T, *shape), x0_hat.reshape(B, T, *shape)

    def trajectory_nll(self, traj: Trajectory, prompts) -> torch.Tensor:
        """Exact negative log-likelihood of each trajectory in nats, (B,)."""
        ids, mask = self.tokenize(prompts)
        return self.trajectory_terms(traj, ids, mask)[0]

    # -- sampling (Algorithm 2) -------------------------------------------------------------------

    def predict(self, u_t, t: float, s: float, T: int, ids, mask, guidance: float = 0.0):
        """Guided Gaussian over u_s: u_t (B, C, H, W) -> mu, log_sigma (B, C, H, W)."""
        B = u_t.shape[0]
        full = lambda v: torch.full((B,), float(v), device=u_t.device)  # noqa: E731
        emb = self.prompt_encoder(ids)
        if guidance == 0.0:
            mu, ls, _ = self.predictor(u_t, full(t), full(s), full(T), emb, mask)
            return mu, ls
        null = self.prompt_encoder(torch.full_like(ids, NULL_ID))
        mu, ls, _ = self.predictor(
            torch.cat([u_t, u_t]), full(t).repeat(2), full(s).repeat(2), full(T).repeat(2),
            torch.cat([emb, null]), torch.cat([mask, mask]),
        )  # one pass over 2B: conditional then unconditional
        return guided_gaussian(mu[:B], ls[:B], mu[B:], ls[B:], guidance)

    @torch.no_grad()
    def sample_levels(self, ids, mask, steps: int, rng: np.random.Generator, guidance: float, t_min: float):
        """Steps 1-2 of Algorithm 2, all in u-space, keeping every level: -> u (B, K, C, H, W) ordered
        t_0 .. t_T, and the grid ts (K,). Noise comes from the numpy ``rng`` in a fixed order (u_T,
        then one z per step), so the torch-free runtime can reproduce it exactly."""
        B = ids.shape[0]
        shape = (B, self.config.channels, self.config.image_size, self.config.image_size)
        ts = schedule.time_grid(steps, t_min, self.config.shift)

        def normal():
            return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(self.device)

        levels = [normal()]  # 1. u_T ~ N(0, I)
        for k in range(steps, 0, -1):  # 2. u_{k-1} = mu + sigma z
            mu, log_sigma = self.predict(levels[-1], ts[k], ts[k - 1], steps, ids, mask, guidance)
            levels.append(mu + torch.exp(log_sigma) * normal())
        return torch.stack(levels[::-1], dim=1), ts

    def sample_u(self, ids, mask, steps: int, rng: np.random.Generator, guidance: float, t_min: float):
        """The cleanest level u_t0 (B, C, H, W) of ``sample_levels``, and t0."""
        u, ts = self.sample_levels(ids, mask, steps, rng, guidance, t_min)
        return u[:, 0], float(ts[0])

    @torch.no_grad()
    def sample_euler(self, ids, mask, steps: int, rng: np.random.Generator, guidance: float) -> torch.Tensor:
        """The flow-matching baseline: Euler on dx/dt = v from t = 1 to 0 on the (shifted) grid, with
        guidance on the velocity, v = (1 + w) v_c - w v_u. Same noise order as ``sample_u``."""
        B = ids.shape[0]
        shape = (B, self.config.channels, self.config.image_size, self.config.image_size)
        ts = schedule.time_grid(steps, 0.0, self.config.shift)
        x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(self.device)
        emb, null = self.prompt_encoder(ids), self.prompt_encoder(torch.full_like(ids, NULL_ID))
        for k in range(steps, 0, -1):
            t = torch.full((B,), float(ts[k]), device=x.device)
            v = self.predictor.velocity(x, t, emb, mask)
            if guidance:
                v = (1 + guidance) * v - guidance * self.predictor.velocity(x, t, null, mask)
            x = x - float(ts[k] - ts[k - 1]) * v
        return x

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], steps: int = 4, seed: int = 0, guidance: float = 0.0,
               t_min: float | None = None, batch_size: int = 256) -> np.ndarray:
        """Generate one image per prompt -> uint8 (N, H, W, C).

        3a. Leave u-space by inverting the transporter: x_t0 = f_T^-1(u_t0), then x0 ~ x_t0 / (1 - t0).
        A flow-matching baseline (objective "fm") integrates its velocity with Euler instead.
        """
        t_min = self.config.t_min_sample if t_min is None else t_min
        rng = np.random.default_rng(seed)
        out = []
        for i in range(0, len(prompts), batch_size):
            ids, mask = self.tokenize(prompts[i : i + batch_size])
            if self.config.objective == "fm":
                out.append(to_uint8(self.sample_euler(ids, mask, steps, rng, guidance)))
                continue
            u, t0 = self.sample_u(ids, mask, steps, rng, guidance, t_min)
            x = self.transporter.inverse(u, t0, steps) / (1.0 - t0)
            out.append(to_uint8(x))
        return np.concatenate(out)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (B, C, H, W) -> uint8 (B, H, W, C)."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def dequantize(images: torch.Tensor, generator=None) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [-1, 1] with uniform dequantisation:
    x = (pixel + U[0, 1)) / 128 - 1, so a density on x is a density on the 8-bit scale / 128^D."""
    x = images.permute(0, 3, 1, 2).float()
    noise = torch.rand(x.shape, generator=generator, device=x.device)
    return (x + noise) / 128.0 - 1.0
