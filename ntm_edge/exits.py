"""Images from a torch model: ``sample_images`` (the one torch sampling entry point: Algorithm 2 in
u-space, then an exit) and the ways out of u-space after the four steps (docs/design.md 3):

- ``inverse``: x_t0 = f_T^-1(u_t0), then x0 ~ x_t0 / (1 - t0). Exact.
- ``inverse+score``: trajectory score denoising (paper 3.5, Algorithm 3). Invert every level
  (batched over levels), take the gradient of the exact trajectory NLL L, and apply Tweedie's
  formula to the whole trajectory, whose levels given x0 are Gaussian with covariance S (Prop. 3):
  E[(1 - t) x0 | trajectory] = x - S grad L, read at t_0.
- ``denoiser``: the learned one-pass denoiser g_phi(u_t0, prompt) -> x0 (paper 3.9, denoiser.py).

A contextual transporter's sampler already ends in x-space (it inverts f_T at every step), so its
``inverse`` exit is x0 ~ x_t0 / (1 - t0) and ``inverse+score`` denoises the sampled x levels as they are;
it has no denoiser exit.

The flow-matching baseline (objective "fm") has no u-space: it integrates its velocity with Euler.
"""

from __future__ import annotations

import numpy as np
import torch

from . import schedule
from .decoding import DEFAULT_METHOD
from .errors import ConfigError
from .model import NTM, Trajectory
from .numerics import to_uint8
from .runtime.bundle import NumericsError
from .sampling import NOISE_BATCH

EXITS = ("inverse", "inverse+score", "denoiser")


def invert_levels(model: NTM, u: torch.Tensor, ts, method: str = DEFAULT_METHOD) -> Trajectory:
    """u (B, K, C, H, W) on the grid ts ((K,) or (B, K)) -> the x trajectory, every level inverted
    in one batched call (a contextual model's sampled levels are x already: returned as they are)."""
    B, K = u.shape[:2]
    t = torch.as_tensor(np.asarray(ts), dtype=torch.float32, device=u.device).expand(B, K)
    if model.contextual:
        return Trajectory(u, t)
    x = model.transporter.inverse(u.reshape(B * K, *u.shape[2:]), t.reshape(-1), K - 1, method=method)
    return Trajectory(x.reshape(u.shape), t)


def score_denoise(model: NTM, traj: Trajectory, ids, mask, clip_percentile: float | None = None) -> torch.Tensor:
    """Algorithm 3: x_den = (x - S grad L) / (1 - t), read at t_0 -> (B, C, H, W).

    clip_percentile: clip each example's gradient at this percentile of its absolute values (the
    low-noise levels can give a few very large entries).
    """
    x = traj.x.detach().requires_grad_(True)  # (B, K, C, H, W)
    with torch.enable_grad():
        nll = model.trajectory_terms(Trajectory(x, traj.t), ids, mask)[0]  # (B,)
        (grad,) = torch.autograd.grad(nll.sum(), x)
    if clip_percentile is not None:
        q = torch.quantile(grad.abs().flatten(1), clip_percentile / 100.0, dim=1)  # (B,)
        q = q.view(-1, *([1] * (grad.ndim - 1)))
        grad = torch.maximum(torch.minimum(grad, q), -q)
    S = torch.as_tensor(np.stack([schedule.trajectory_covariance(t) for t in traj.t.detach().cpu().numpy()]),
                        dtype=grad.dtype, device=grad.device)  # (B, K, K)
    x_den = x.detach() - torch.einsum("bij,bj...->bi...", S, grad)
    return schedule.decoder_mean(x_den[:, 0], traj.t[:, 0].view(-1, 1, 1, 1))


def sample_images(model: NTM, prompts, steps: int = 4, seed: int = 0, guidance: float = 0.0,
                  final: str = "inverse", denoiser=None, clip_percentile: float | None = 99.0,
                  inverse_method: str = DEFAULT_METHOD, temperature: float = 1.0) -> np.ndarray:
    """One image per prompt -> uint8 (N, H, W, C): Algorithm 2 with the chosen exit (``EXITS``).

    The noise is ``sampling``'s convention (one numpy generator seeded with ``seed``, drawn per chunk of
    ``NOISE_BATCH`` prompts, scaled by ``temperature``), so the runtime draws the same images.
    inverse_method: "jacobi" or "sequential" (both exact, ``decoding``) for the exits that invert the
    transporter.
    """
    if final not in EXITS:
        raise ConfigError(f"unknown exit {final!r}; choose one of: {', '.join(EXITS)}")
    fm = model.config.objective == "fm"  # the flow-matching baseline has no u-space: Euler
    if final == "denoiser" and model.contextual:
        raise ConfigError("a model with a contextual transporter has no denoiser exit; use --final inverse or inverse+score")
    if final == "denoiser" and denoiser is None and not fm:
        raise ConfigError("this checkpoint has no denoiser; train one with `ntm-edge train-denoiser` or pick another --final")
    rng = np.random.default_rng(seed)
    t_min = denoiser.config.t0 if final == "denoiser" and denoiser is not None else model.config.t_min_sample
    out = []
    for i in range(0, len(prompts), NOISE_BATCH):
        ids, mask = model.tokenize(prompts[i : i + NOISE_BATCH])
        if fm:
            x = model.sample_euler(ids, mask, steps, rng, guidance, temperature)
        elif final == "inverse+score":
            u, ts = model.sample_levels(ids, mask, steps, rng, guidance, t_min, temperature, inverse_method)
            with torch.no_grad():
                traj = invert_levels(model, u, ts, inverse_method)
            x = score_denoise(model, traj, ids, mask, clip_percentile)
        else:
            u, t0 = model.sample_u(ids, mask, steps, rng, guidance, t_min, temperature, inverse_method)
            with torch.no_grad():
                if final == "denoiser":
                    x = denoiser(u, ids, mask)
                elif model.contextual:  # the levels are x already
                    x = schedule.decoder_mean(u, t0)
                else:
                    x = schedule.decoder_mean(model.transporter.inverse(u, t0, steps, method=inverse_method), t0)
        if not torch.isfinite(x).all():  # NaN would become black pixels: say so, as the runtime does
            raise NumericsError(f"the sampler produced NaN or inf values (guidance {guidance}, "
                               f"temperature {temperature}, seed {seed})")
        out.append(to_uint8(x))
    return np.concatenate(out)
