"""Training objectives. Each takes clean images x0 (B, C, H, W) in [-1, 1], prompt ids and mask
(B, P), and the run's torch.Generator (all randomness flows from it, so --resume is exact), and
returns ``Losses``: the objective's main term plus the optional terms the config weighs in.

- end-to-end NLL: all T levels of an example in one pass (paper 3.4);
- pairwise NLL: one (t, s) step per example, T drawn from a set of step counts ({4, 8, 16} by default);
- flow matching: velocity MSE (the baseline, objective "fm");
- mean alignment (paper 3.7): lambda ||mu_P - mu_FM||^2 against a frozen flow-matching teacher.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from . import schedule
from .model import NTM


@dataclass
class Losses:
    main: torch.Tensor  # NLL in nats/dim (or the FM velocity MSE)
    x0_mse: torch.Tensor  # ||x0-hat - f_T(x0, s)||^2 per dim (the optional hybrid term, ``x0_target``)
    align: torch.Tensor | None = None  # ||mu_P - mu_FM||^2 per dim, with a teacher

    def total(self, x0_mse_weight: float, align_weight: float) -> torch.Tensor:
        loss = self.main + x0_mse_weight * self.x0_mse
        return loss if self.align is None else loss + align_weight * self.align


def draw_t_min(cfg, n: int, g: torch.Generator, device) -> torch.Tensor:
    """t_min ~ U[t_min_low, t_min_max] per example, (n,)."""
    return schedule.t_min_from_uniform(torch.rand(n, generator=g, device=device), cfg.t_min_low, cfg.t_min_max)


def teacher_mean(teacher: NTM | None, x_t, t, s, T, ids, mask) -> torch.Tensor | None:
    """mu_FM: the frozen flow-matching model's posterior mean, acting in x-space (paper 3.7)."""
    if teacher is None:
        return None
    with torch.no_grad():
        return teacher.predictor(x_t, t, s, T, teacher.prompt_encoder(ids), mask)[0]


X0_SPACES = ("u", "x")  # the hybrid term's target: f_T(x0, s) (the predictor's own space) | x0 (the default)


@torch.no_grad()
def x0_target(model: NTM, x0: torch.Tensor, s: torch.Tensor, T: torch.Tensor, space: str = "u") -> torch.Tensor:
    """The hybrid term's target: x0 mapped into the u-space that the predictor's x0-hat lives in.

    The predictor works in u-space: x0-hat = u_t - t v(u_t) enters mu_P = A u_t + B x0-hat, the mean of
    u_s = f_T(x_s, s). Compared with x0 itself (x-space), the term is smallest when f_T is the identity,
    so it pulls the transporter there (issue 13). ``space`` "u" targets f_T(x0, s, T) instead, x0 through
    the transporter of the level s being predicted (where s -> 0, u_s -> f_T(x0, s): mu_P's target). With
    no transporter (Gaussian baseline, identity ablation) that is x0 exactly, the term unchanged.
    The target is held fixed within a step (no gradient), but it follows f_T from step to step, so a
    transporter that shrinks every level still lowers the term: measured (docs/transporter-study.md,
    the first `tiny` study), that is mostly what f_T learns with it. Neither target is recommended over training on the
    NLL alone for moving f_T; the x-space one gives better samples at some cost in likelihood.

    ``space`` "x" (the default of ``train --x0-mse-space``) returns x0 itself.

    x0 (N, C, H, W), s (N,), T (N,) -> (N, C, H, W).
    """
    if space == "u" and model.contextual:  # f_T(x0, s) would need an x_t: refused by `train` before any work
        raise ValueError("the hybrid term's u-space target is not defined for a contextual transporter")
    return x0 if space == "x" else model.transporter(x0, s, T)[0]


def end2end_loss(model: NTM, x0, ids, mask, g: torch.Generator, teacher: NTM | None = None,
                 x0_space: str = "x") -> Losses:
    """Trajectory NLL per dim with T = config.steps and a random t_min per example."""
    cfg = model.config
    B, T, shape = x0.shape[0], cfg.steps, x0.shape[1:]
    traj = model.forward_trajectory(x0, T, generator=g, t_min=draw_t_min(cfg, B, g, x0.device))
    nll, mu, x0_hat = model.trajectory_terms(traj, ids, mask)  # x0_hat (B, T, C, H, W): step k predicts level k-1
    target = x0_target(model, x0.repeat_interleave(T, dim=0), traj.t[:, :-1].reshape(B * T),
                       torch.full((B * T,), float(T), device=x0.device), x0_space).reshape(B, T, *shape)
    losses = Losses(nll.mean() / cfg.dims, (x0_hat - target).pow(2).mean())
    if teacher is not None:
        rep = lambda v: v.repeat_interleave(T, dim=0)  # noqa: E731  (B, ...) -> (B*T, ...)
        mu_fm = teacher_mean(teacher, traj.x[:, 1:].reshape(B * T, *shape), traj.t[:, 1:].reshape(-1),
                             traj.t[:, :-1].reshape(-1), torch.full((B * T,), float(T), device=x0.device),
                             rep(ids), rep(mask))
        losses.align = (mu.reshape(B * T, *shape) - mu_fm).pow(2).mean() * T  # summed over the T steps
    return losses


def step_grids(shift: float, counts: tuple[int, ...] = schedule.STEP_COUNTS) -> torch.Tensor:
    """The time grids of every T in ``counts`` (``schedule.time_grid`` with t_min = 0), one row each,
    padded with 1 to the longest: (len(counts), max T + 1), float32."""
    longest = max(counts)
    rows = [np.pad(schedule.time_grid(T, 0.0, shift), (0, longest - T), constant_values=1.0) for T in counts]
    return torch.as_tensor(np.stack(rows), dtype=torch.float32)


def pairwise_loss(model: NTM, x0, ids, mask, g: torch.Generator, teacher: NTM | None = None,
                  x0_space: str = "x", step_counts: tuple[int, ...] = schedule.STEP_COUNTS) -> Losses:
    """One step per example: T ~ U(step_counts), k ~ U{1..T}, NLL of x_{t_(k-1)} given x_{t_k} per dim.
    ``step_counts`` (4,) trains only the transitions of the 4-step grid, as end-to-end training does."""
    cfg, B, dev = model.config, x0.shape[0], x0.device
    counts = torch.tensor(step_counts, dtype=torch.float32, device=dev)
    row = torch.randint(len(counts), (B,), generator=g, device=dev)  # (B,): which T
    T = counts[row]  # (B,)
    k = torch.floor(torch.rand(B, generator=g, device=dev) * T) + 1  # (B,) in 1..T
    grids = step_grids(cfg.shift, step_counts).to(dev)  # (len(step_counts), max T + 1)
    t = grids[row, k.long()]
    t_min = draw_t_min(cfg, B, g, dev)
    s = torch.where(k == 1, t_min, grids[row, k.long() - 1])
    levels = schedule.forward_trajectory(x0, torch.stack([s, t], dim=1), g)  # (B, 2, C, H, W): x_s, x_t
    x_s, x_t = levels[:, 0], levels[:, 1]
    if model.contextual:  # u_s = f_T(x_s; s, T, x_t), and the predictor reads x_t
        u_s, logdet_s = model.transporter(x_s, s, T, context=x_t)
        nll, mu, x0_hat = model.step_terms(u_s, logdet_s, x_t, s, t, T, ids, mask)
    else:
        u, logdet = model.transporter(torch.cat([x_s, x_t]), torch.cat([s, t]), torch.cat([T, T]))
        nll, mu, x0_hat = model.step_terms(u[:B], logdet[:B], u[B:], s, t, T, ids, mask)
    losses = Losses(nll.mean() / cfg.dims, (x0_hat - x0_target(model, x0, s, T, x0_space)).pow(2).mean())
    if teacher is not None:
        losses.align = (mu - teacher_mean(teacher, x_t, t, s, T, ids, mask)).pow(2).mean()
    return losses


def flow_matching_loss(model: NTM, x0, ids, mask, g: torch.Generator, teacher: NTM | None = None) -> Losses:
    """x_t = (1 - t) x0 + t eps, t ~ U[0, 1]; MSE of v(x_t, t) against eps - x0."""
    B, dev = x0.shape[0], x0.device
    t = torch.rand(B, generator=g, device=dev)
    eps = torch.randn(x0.shape, generator=g, device=dev)
    mean, std = schedule.marginal_coeffs(t.view(B, 1, 1, 1))
    x_t = mean * x0 + std * eps  # (2.1)
    v = model.predictor.velocity(x_t, t, model.prompt_encoder(ids), mask)
    x0_hat = schedule.x0_from_velocity(x_t, t.view(B, 1, 1, 1), v)
    return Losses((v - (eps - x0)).pow(2).mean(), (x0_hat - x0).pow(2).mean())


def loss_function(objective: str, mode: str, x0_space: str = "x", step_counts: tuple[int, ...] = schedule.STEP_COUNTS):
    """The loss of an objective and mode; ``x0_space`` picks the hybrid term's target (``x0_target``),
    ``step_counts`` the grids that pairwise training draws T from."""
    if objective == "fm":
        return flow_matching_loss
    if mode == "end2end":
        return functools.partial(end2end_loss, x0_space=x0_space)
    return functools.partial(pairwise_loss, x0_space=x0_space, step_counts=tuple(step_counts))
