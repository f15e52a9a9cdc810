"""Held-out likelihood of a model: exact trajectory NLL and the bits/dim bound (DESIGN.md 4)."""

from __future__ import annotations

import numpy as np
import torch

from . import schedule
from .model import NTM, dequantize


@torch.no_grad()
def heldout_likelihood(model: NTM, images: np.ndarray, labels: np.ndarray, steps: int | None = None,
                       seed: int = 0, batch_size: int = 250, t_min: float | None = None) -> dict:
    """Score forward trajectories of real images (uint8 (N, H, W, C), labels (N,)).

    Returns trajectory nats/dim (the exact NLL of the sampled trajectory, over D = C H W) and
    bits/dim: the variational bound on -log p(x0) on the 8-bit scale. Deterministic for a seed.
    """
    steps = steps or model.config.steps
    t_min = model.config.t_min_sample if t_min is None else t_min
    g = torch.Generator(device=model.device).manual_seed(seed)
    D = model.config.dims
    total = []
    was_training = model.training
    model.eval()
    for i in range(0, len(images), batch_size):
        x0 = dequantize(torch.from_numpy(images[i : i + batch_size]).to(model.device), g)
        traj = model.forward_trajectory(x0, steps, generator=g, t_min=t_min)
        ids = torch.from_numpy(model.vocab.ids_for_labels(labels[i : i + batch_size])).to(model.device)
        total.append(model.trajectory_nll(traj, ids).double().cpu())
    model.train(was_training)
    nats = float(torch.cat(total).mean()) / D
    offset = float(schedule.bound_offset_per_dim(schedule.time_grid(steps, t_min, model.config.shift)))
    return {
        "steps": steps,
        "t_min": t_min,
        "trajectory_nats_per_dim": nats,
        "bits_per_dim": float(schedule.bits_per_dim(nats + offset)),
        "num_images": int(len(images)),
    }
