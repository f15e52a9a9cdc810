"""The likelihood audit on the runtime (docs/design.md 4), numpy + onnxruntime.

- ``trajectory_nll``: the exact -log p(x_t0, ..., x_tT | y) of trajectories in x-space (paper 3.4),
  -log N(f_T(x_1); 0, I) + sum over steps [-log N(f_T(x_s); mu_P, sigma_P^2) - log|det df_T/dx_s|],
  from the transporter-forward and predictor-step graphs, assembled by ``schedule.trajectory_nll``
  (in float64) as ``NTM.trajectory_nll`` assembles it from the torch modules.
- ``generated_nll``: that NLL for trajectories the sampler drew (every level inverted, then scored).
- ``image_bound``: the variational bound on -log p(x0) of images in bits/dim on the 8-bit scale,
  averaged over a few forward trajectories (``schedule.forward_trajectory``, ``numerics.dequantize``;
  what ``evaluate.heldout_likelihood`` computes with torch).

Scores are under the conditional model (guidance weight 0): that is the model's density.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ntm_edge import schedule
from ntm_edge.decoding import DEFAULT_METHOD
from ntm_edge.errors import ConfigError
from ntm_edge.numerics import dequantize

from .inversion import context_input, contextual, invert
from .session import Runtime
from .specs import PREDICTOR_STEP, PROMPT_ENCODER, TRANSPORTER_FORWARD


def transport(rt: Runtime, x: np.ndarray, t: np.ndarray, steps: int,
              context: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """u = f_T(x, t, T) (given the step's x_t ``context`` for a contextual transporter), log|det| (B,);
    the identity when the model has no transporter blocks."""
    if not rt.bundle.transporter["num_blocks"]:
        return x, np.zeros(len(x))
    out = rt[TRANSPORTER_FORWARD](x=x, t=t, steps=np.full(len(x), steps, dtype=np.float32), **context_input(context))
    return out["u"], out["logdet"]


def trajectory_nll(rt: Runtime, x: np.ndarray, ts: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Exact NLL in nats of trajectories x (B, K, C, H, W) on the grid ts ((K,) or (B, K)) -> (B,) float64.
    A contextual transporter maps level k given level k + 1 (the top level is the identity) and its
    predictor reads x_t (``NTM.transporter_levels``)."""
    B, K = x.shape[:2]
    T = K - 1
    ts = np.broadcast_to(np.asarray(ts, dtype=np.float32), (B, K))
    x = np.ascontiguousarray(x, dtype=np.float32)
    if contextual(rt):
        levels = [transport(rt, x[:, k], ts[:, k], T, x[:, k + 1]) for k in range(T)] + [(x[:, T], np.zeros(B))]
    else:
        levels = [transport(rt, x[:, k], ts[:, k], T) for k in range(K)]
    u, logdet = zip(*levels, strict=True)
    read = [x[:, k] for k in range(K)] if contextual(rt) else u  # the level each step's predictor reads
    emb = rt[PROMPT_ENCODER](ids=ids)["prompt_emb"]
    steps = [rt[PREDICTOR_STEP](u_t=read[k], t=ts[:, k], s=ts[:, k - 1], steps=np.full(B, T, dtype=np.float32),
                                prompt_emb=emb, prompt_mask=mask) for k in range(1, K)]  # step k: level k-1 given k
    f64 = lambda levels: np.stack(levels, axis=1).astype(np.float64)  # noqa: E731  sums of many terms: float64
    return schedule.trajectory_nll(f64(u), f64(logdet), f64([o["mu"] for o in steps]), f64([o["log_sigma"] for o in steps]))


def generated_nll(rt: Runtime, u: np.ndarray, ts: np.ndarray, ids, mask, method: str = DEFAULT_METHOD,
                  **settings) -> np.ndarray:
    """Exact NLL (nats, (B,)) of sampled trajectories given in u-space (B, K, C, H, W): invert every level
    (``exits.invert_levels``; ``settings``: segments, tol, max_iters), then score the x trajectory.
    A contextual bundle's sampler returns x levels: scored as they are."""
    if contextual(rt):
        return trajectory_nll(rt, u, ts, ids, mask)
    steps = u.shape[1] - 1
    x = np.stack([invert(rt, u[:, k], ts[k], steps, method, **settings)[0] for k in range(u.shape[1])], axis=1)
    return trajectory_nll(rt, x, ts, ids, mask)


def image_bound(rt: Runtime, images: np.ndarray, prompts, steps: int | None = None, trajectories: int = 4,
                seed: int = 0, t_min: float | None = None) -> dict:
    """Bits/dim bound on -log p(x0 | y) of uint8 images (N, H, W, C), averaged over ``trajectories``
    forward trajectories per image (``evaluate.heldout_likelihood``) -> {"bits_per_dim" (N,), ...}."""
    cfg = rt.bundle.config
    steps = cfg.steps if steps is None else steps  # 0 is an error below, not the default
    t_min = cfg.t_min_sample if t_min is None else t_min
    if trajectories < 1 or steps < 1:
        raise ConfigError(f"--trajectories and --steps must be at least 1, got {trajectories} and {steps}")
    want = (cfg.image_size, cfg.image_size, cfg.channels)
    if images.ndim != 4 or images.shape[1:] != want or images.dtype != np.uint8:
        raise ConfigError(f"the model scores uint8 images of shape (H, W, C) = {want}, got {images.dtype} "
                          f"{tuple(images.shape[1:])}")
    ids, mask = rt.bundle.vocab.tokenize(list(prompts))
    ts = schedule.time_grid(steps, t_min, cfg.shift)  # (T + 1,)
    rng = np.random.default_rng(seed)
    total = np.zeros(len(images))
    batch = rt.bundle.batch
    for _ in range(trajectories):
        for b in range(0, len(images), batch):
            sl = slice(b, b + batch)
            x0 = dequantize(images[sl], rng)  # float64
            x = schedule.forward_trajectory(x0, ts, rng).astype(np.float32)  # (B, K, C, H, W)
            total[sl] += trajectory_nll(rt, x, ts, ids[sl], mask[sl])
    nats = total / trajectories / cfg.dims
    return {"bits_per_dim": schedule.bound_bits_per_dim(nats, ts), "trajectory_nats_per_dim": nats,
            "steps": steps, "t_min": t_min, "trajectories": trajectories}


def load_images(path, channels: int) -> np.ndarray:
    """A PNG (one image) or .npy (uint8 (N, H, W[, C]) or (H, W[, C])) -> uint8 (N, H, W, C)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} is a directory, not an image file" if path.is_dir() else
                          f"image file {path} does not exist" if not path.exists() else f"{path} is not a regular file")
    if path.suffix.lower() == ".npy":
        try:  # memory-mapped first: a header that promises more than the file holds is refused, not allocated
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # EOFError: an empty file
            raise ConfigError(f"{path} is not a readable .npy array ({str(e) or e.__class__.__name__})") from None
        if arr.dtype != np.uint8:
            raise ConfigError(f"{path} holds {arr.dtype}; the audit scores uint8 images (as `run --save-array` writes)")
        arr = np.array(arr)
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == channels and arr.shape[0] != channels):
            arr = arr[None]  # one image, (H, W) or (H, W, C)
        arr = arr[..., None] if arr.ndim == 3 else arr  # (N, H, W) -> (N, H, W, 1)
        if arr.ndim != 4:
            raise ConfigError(f"{path} has shape {arr.shape}; expected (N, H, W, C), (N, H, W) or (H, W, C)")
        if arr.size == 0:
            raise ConfigError(f"{path} holds no images (shape {arr.shape})")
        return arr
    try:
        with warnings.catch_warnings():  # Pillow's warning about a huge image: an error here, not a second line
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path).convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        too_big = isinstance(e, Image.DecompressionBombError | Image.DecompressionBombWarning)
        raise ConfigError(f"{path} is not a readable image ({e if too_big else e.__class__.__name__})") from None
    arr = np.asarray(img, dtype=np.uint8)
    return (arr[..., None] if arr.ndim == 2 else arr)[None]
