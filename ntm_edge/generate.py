"""`ntm-edge sample`: load a checkpoint, run Algorithm 2, write the grid and the array."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .images import save_array, save_grid


def generate(checkpoint, prompt: str, num: int = 16, steps: int = 4, seed: int = 0, guidance: float = 0.0,
             out="samples.png", save_array_to=None, final: str | None = None, inverse_method: str = "sequential",
             device: str = "cpu", log=print) -> np.ndarray:
    """final: the exit from u-space (exits.EXITS); default: the denoiser when the checkpoint has one."""
    if num < 1:
        raise ConfigError("--num must be at least 1")
    if steps < 1:
        raise ConfigError("--steps must be at least 1")
    if guidance < 0:
        raise ConfigError("--guidance must be >= 0")
    from .denoiser import has_denoiser, load_denoiser
    from .exits import sample_images
    from .model import NTM

    if device != "cpu":  # the GPU path (ntm_edge/gpu.py): CUDA graphs and autocast
        from .gpu import require_cuda, sample_images_gpu

        require_cuda(device)
        sample_images = functools.partial(sample_images_gpu, log=log)
    model = NTM.from_pretrained(checkpoint, device=device)
    model.vocab.token_id(prompt)  # an unknown prompt fails here, before any work
    final = final or ("denoiser" if has_denoiser(checkpoint) else "inverse")
    denoiser = load_denoiser(checkpoint, device=device) if final == "denoiser" and has_denoiser(checkpoint) else None
    start = time.perf_counter()
    images = sample_images(model, [prompt] * num, steps=steps, seed=seed, guidance=guidance, final=final,
                           denoiser=denoiser, inverse_method=inverse_method)
    elapsed = time.perf_counter() - start
    save_grid(images, Path(out))
    if save_array_to:
        save_array(images, Path(save_array_to))
    log(f"wrote {out} ({num} images, {steps} steps, exit {final}, {elapsed:.2f} s)")
    return images
