"""The Normalizing Trajectory Model: transporter + predictor + prompt encoder, its exact trajectory
likelihood (paper 3.4), and the u-space steps of the sampler (Algorithm 2, ``sampling.reverse_levels``).
Images come out of ``exits.sample_images``, the one torch sampling entry point.

One reverse step p(x_s | x_t) is a normalizing flow:

    u = f_T(x, t, T),   u_s ~ N(mu_P(u_t), sigma_P^2),
    -log p(x_s | x_t) = -log N(f_T(x_s); mu_P, sigma_P^2) - log|det df_T/dx_s|

and the trajectory's NLL is the sum over the T steps plus -log N(x_1; 0, I) for the pure-noise top.

With a contextual transporter (``TransporterConfig.context``) the level s map also reads x_t and the
predictor reads x_t itself:

    u_s = f_T(x_s; s, T, x_t),   u_s ~ N(mu_P(x_t), sigma_P^2)

The step is still a normalizing flow in x_s with an exact log-det. Sampling then works in x-space: each
step draws u_s and inverts f_T(.; s, T, x_t) to get x_s, the next step's input (``sample_levels``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import schedule
from .config import NTMConfig
from .decoding import DEFAULT_METHOD
from .numerics import guided_gaussian
from .predictor import Predictor
from .prompts import make_vocab
from .sampling import draw_noise, reverse_levels
from .transporter import Transporter


@dataclass
class Trajectory:
    """Levels x_t0 .. x_tT of B examples: x (B, K, C, H, W), t (B, K), K = T + 1, t[:, -1] = 1."""

    x: torch.Tensor
    t: torch.Tensor

    @property
    def steps(self) -> int:
        return self.x.shape[1] - 1


class LabelEncoder(nn.Module):
    """Prompt ids (B, P) -> embeddings (B, P, E); row 0 is the null (unconditional) prompt."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)


def make_prompt_encoder(prompt_config, vocab) -> nn.Module:
    """ids (B, P) -> prompt tokens (B, P, E): a learned table for labels, the frozen MiniLM for text."""
    if prompt_config.kind == "label":
        return LabelEncoder(vocab.num_tokens, prompt_config.dim)
    from .text_prompts import TextPromptEncoder

    return TextPromptEncoder(prompt_config.max_tokens)


class NTM(nn.Module):
    def __init__(self, config: NTMConfig):
        super().__init__()
        self.config = config.validate()
        self.vocab = make_vocab(config.prompt)
        self.prompt_encoder = make_prompt_encoder(config.prompt, self.vocab)
        self.transporter = Transporter(config.transporter, config.channels, config.image_size)
        self.predictor = Predictor(config.predictor, config.channels, config.image_size, config.prompt.dim)

    # -- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device: str = "cpu") -> NTM:
        """The model in checkpoint directory ``path``; the string "default" is the model shipped in the
        package (``ntm_edge.assets``; every shipped file checked against its recorded sha256)."""
        from .assets import resolve_checkpoint
        from .checkpoint import load_model

        return load_model(resolve_checkpoint(path), device=device)

    def save_pretrained(self, path) -> None:
        from .checkpoint import save_model

        save_model(self, path)

    @property
    def contextual(self) -> bool:
        """Whether the transporter reads each step's x_t (the sampler then inverts it at every step)."""
        return self.transporter.contextual

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- prompts ----------------------------------------------------------------------------------

    def tokenize(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (list of str) or ids (B, P) -> ids (B, P), mask (B, P) on the model's device."""
        if isinstance(prompts, torch.Tensor):
            ids = prompts.to(self.device).long()
            return ids, self.vocab.mask_of(ids)
        ids_np, mask_np = self.vocab.tokenize(list(prompts))
        return torch.from_numpy(ids_np).to(self.device), torch.from_numpy(mask_np).to(self.device)

    def null_prompt(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional prompt n times: ids, mask (n, P) on the model's device."""
        ids, mask = self.vocab.null(n)
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)

    # -- trajectories and their likelihood --------------------------------------------------------

    def forward_trajectory(self, x0: torch.Tensor, steps: int | None = None, generator=None, t_min=None):
        """Markov forward process (2.3, ``schedule.forward_trajectory``) from x0 (B, C, H, W) on this
        model's grid -> Trajectory with K = steps + 1 levels; noise from the torch ``generator``.

        t_min: float or (B,) tensor for the cleanest level (default ``config.t_min_sample``).
        """
        steps = steps or self.config.steps
        B = x0.shape[0]
        t_min = self.config.t_min_sample if t_min is None else t_min
        t_min = torch.as_tensor(t_min, dtype=torch.float32, device=x0.device).expand(B)
        upper = torch.as_tensor(schedule.time_grid(steps, 0.0, self.config.shift)[1:], dtype=torch.float32)
        ts = torch.cat([t_min[:, None], upper.to(x0.device).expand(B, steps)], dim=1)  # (B, K)
        return Trajectory(schedule.forward_trajectory(x0, ts, generator), ts)

    def step_terms(self, u_s, logdet_s, u_t, s, t, T, ids, mask):
        """Exact -log p(x_s | x_t) of one step per example (B,), with the predictor's mean and x0-hat.

        u_s, u_t (B, C, H, W) = f_T of x_s, x_t (a contextual model: f_T(x_s; x_t), and x_t itself, which its
        predictor reads); logdet_s (B,); s, t, T (B,); ids, mask (B, P)
        -> nll (B,), mu (B, C, H, W), x0_hat (B, C, H, W).
        """
        mu, log_sigma, x0_hat = self.predictor(u_t, t, s, T, self.prompt_encoder(ids), mask)
        return schedule.step_nll(u_s, logdet_s, mu, log_sigma), mu, x0_hat

    def transporter_inputs(self, traj: Trajectory):
        """What f_T maps of a trajectory (B, K, ...), flattened for one batched call -> x (M, C, H, W), t (M,),
        context (M, C, H, W) or None: every level (M = B K), or for a contextual transporter every level
        below the top (M = B (K - 1)), each given the next level up (its step's condition)."""
        B, K = traj.t.shape
        if not self.contextual:
            return traj.x.reshape(B * K, *traj.x.shape[2:]), traj.t.reshape(B * K), None
        flat = lambda v: v.reshape(B * (K - 1), *v.shape[2:])  # noqa: E731
        return flat(traj.x[:, :-1]), flat(traj.t[:, :-1]), flat(traj.x[:, 1:])

    def transporter_levels(self, traj: Trajectory) -> tuple[torch.Tensor, torch.Tensor]:
        """f_T of every level of a trajectory, batched -> u (B, K, C, H, W), logdet (B, K).

        Contextual: level k < T is mapped given level k + 1 (its step's condition), and the top level
        is the identity (as the gate makes it for the plain transporter)."""
        B, K = traj.t.shape
        shape = traj.x.shape[2:]
        x, t, context = self.transporter_inputs(traj)
        u, logdet = self.transporter(x, t, K - 1, context=context)
        if not self.contextual:
            return u.reshape(B, K, *shape), logdet.reshape(B, K)
        u = torch.cat([u.reshape(B, K - 1, *shape), traj.x[:, -1:]], dim=1)
        return u, torch.cat([logdet.reshape(B, K - 1), logdet.new_zeros(B, 1)], dim=1)

    def trajectory_terms(self, traj: Trajectory, ids, mask, per_level: bool = False):
        """All T steps of each example in one parallel pass (end-to-end mode).

        -> nll (B,) in nats (with ``per_level``: its terms (B, T + 1), ``schedule.level_nll``); mu, x0_hat
        (B, T, C, H, W) for steps k = 1..T (predicting level k - 1).
        """
        B, K = traj.t.shape
        T = K - 1
        shape = traj.x.shape[2:]
        u, logdet = self.transporter_levels(traj)
        rep = lambda v: v.repeat_interleave(T, dim=0)  # noqa: E731  (B, ...) -> (B*T, ...)
        inputs = traj.x if self.contextual else u  # what the predictor reads of level k
        mu, log_sigma, x0_hat = self.predictor(  # step k = 1..T: level k-1 given level k, (B*T, C, H, W)
            inputs[:, 1:].reshape(B * T, *shape),
            traj.t[:, 1:].reshape(B * T),
            traj.t[:, :-1].reshape(B * T),
            torch.full((B * T,), float(T), device=u.device),
            self.prompt_encoder(rep(ids)),
            rep(mask),
        )
        mu, log_sigma, x0_hat = (v.reshape(B, T, *shape) for v in (mu, log_sigma, x0_hat))
        levels = schedule.level_nll(u, logdet, mu, log_sigma)
        return (levels if per_level else schedule.sum_levels(levels)), mu, x0_hat

    def trajectory_nll(self, traj: Trajectory, prompts, per_level: bool = False) -> torch.Tensor:
        """Exact negative log-likelihood of each trajectory in nats, (B,); with ``per_level`` its terms
        (B, T + 1) ordered t_0 .. t_T (``schedule.level_nll``), whose ``schedule.sum_levels`` it is."""
        ids, mask = self.tokenize(prompts)
        return self.trajectory_terms(traj, ids, mask, per_level)[0]

    # -- sampling (Algorithm 2) -------------------------------------------------------------------

    def predict(self, u_t, t: float, s: float, T: int, ids, mask, guidance: float = 0.0):
        """Guided Gaussian over u_s: u_t (B, C, H, W) -> mu, log_sigma (B, C, H, W)."""
        B = u_t.shape[0]
        full = lambda v: torch.full((B,), float(v), device=u_t.device)  # noqa: E731
        emb = self.prompt_encoder(ids)
        if guidance == 0.0:
            mu, ls, _ = self.predictor(u_t, full(t), full(s), full(T), emb, mask)
            return mu, ls
        null_ids, null_mask = self.null_prompt(B)
        mu, ls, _ = self.predictor(
            torch.cat([u_t, u_t]), full(t).repeat(2), full(s).repeat(2), full(T).repeat(2),
            torch.cat([emb, self.prompt_encoder(null_ids)]), torch.cat([mask, null_mask]),
        )  # one pass over 2B: conditional then unconditional
        return guided_gaussian(mu[:B], ls[:B], mu[B:], ls[B:], guidance)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.config.channels, self.config.image_size, self.config.image_size

    def noise(self, rng: np.random.Generator, n: int, steps: int, temperature: float = 1.0) -> list[torch.Tensor]:
        """The sampler's noise for n prompts (``sampling.draw_noise``) as tensors on the model's device."""
        return [torch.from_numpy(z).to(self.device) for z in draw_noise(rng, n, self.image_shape, steps, temperature)]

    @torch.no_grad()
    def sample_levels(self, ids, mask, steps: int, rng: np.random.Generator, guidance: float, t_min: float,
                      temperature: float = 1.0, inverse_method: str = DEFAULT_METHOD):
        """Steps 1-2 of Algorithm 2 (``sampling.reverse_levels``), all in u-space, keeping every level:
        -> u (B, K, C, H, W) ordered t_0 .. t_T, and the grid ts (K,). The noise is the numpy ``rng``'s,
        in the order of ``sampling.draw_noise`` (scaled by ``temperature``), so the torch-free runtime
        reproduces it exactly. A contextual model's levels are x (each step inverts f_T, by
        ``inverse_method``)."""
        ts = schedule.time_grid(steps, t_min, self.config.shift)
        predict = lambda u_t, t, s: self.predict(u_t, t, s, steps, ids, mask, guidance)  # noqa: E731
        noise = self.noise(rng, ids.shape[0], steps, temperature)
        if self.contextual:  # x-space: each drawn u_s is taken back to x_s through f_T(.; s, T, x_t)
            transport = lambda u_s, x_t, s: self.transporter.inverse(  # noqa: E731
                u_s, s, steps, method=inverse_method, context=x_t)
            return reverse_levels(predict, noise, ts, transport), ts
        return reverse_levels(predict, noise, ts), ts

    def sample_u(self, ids, mask, steps: int, rng: np.random.Generator, guidance: float, t_min: float,
                 temperature: float = 1.0, inverse_method: str = DEFAULT_METHOD):
        """The cleanest level u_t0 (B, C, H, W) of ``sample_levels``, and t0 (for a contextual model, x_t0:
        its levels are in x-space)."""
        u, ts = self.sample_levels(ids, mask, steps, rng, guidance, t_min, temperature, inverse_method)
        return u[:, 0], float(ts[0])

    @torch.no_grad()
    def sample_euler(self, ids, mask, steps: int, rng: np.random.Generator, guidance: float,
                     temperature: float = 1.0) -> torch.Tensor:
        """The flow-matching baseline: Euler on dx/dt = v from t = 1 to 0 on the (shifted) grid, with
        guidance on the velocity, v = (1 + w) v_c - w v_u. Its noise is u_T alone (``draw_noise``), scaled
        by ``temperature`` (a colder start of the ODE)."""
        B = ids.shape[0]
        ts = schedule.time_grid(steps, 0.0, self.config.shift)
        (x,) = self.noise(rng, B, 0, temperature)
        null_ids, null_mask = self.null_prompt(B)
        emb, null = self.prompt_encoder(ids), self.prompt_encoder(null_ids)
        for k in range(steps, 0, -1):
            t = torch.full((B,), float(ts[k]), device=x.device)
            v = self.predictor.velocity(x, t, emb, mask)
            if guidance:
                v = (1 + guidance) * v - guidance * self.predictor.velocity(x, t, null, null_mask)
            x = x - float(ts[k] - ts[k - 1]) * v
        return x
