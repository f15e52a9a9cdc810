"""`ntm-edge sample`: load a checkpoint, run Algorithm 2, write the grid and the array."""

from __future__ import annotations

import functools
import time

import numpy as np

from . import validate
from .decoding import DEFAULT_METHOD, METHODS
from .images import save_images


def generate(checkpoint, prompt: str, num: int = 16, steps: int = 4, seed: int = 0, guidance: float = 0.0,
             out="samples.png", save_array_to=None, final: str | None = None, inverse_method: str = DEFAULT_METHOD,
             device: str = "cpu", log=print, warn=None, temperature: float = 1.0) -> np.ndarray:
    """final: the exit from u-space (exits.EXITS); default: the denoiser when the checkpoint has one and
    was trained for ``steps`` (``validate.exit_for_steps``), else the exact inverse.

    Every option and output path is checked before the sampler runs; warnings (``warn``, default: a
    ``warning:`` line through ``log``) come after all checks have passed.
    """
    validate.count(num, "--num")
    validate.count(steps, "--steps")
    validate.seed(seed)
    guidance = validate.guidance(guidance)
    temperature = validate.temperature(temperature)
    out = validate.image_path(out)
    if save_array_to:
        save_array_to = validate.array_path(save_array_to)
    validate.choice(inverse_method, METHODS, "--inverse-method")
    device = validate.torch_device(device)
    from .assets import resolve_checkpoint
    from .checkpoint import trained_steps
    from .denoiser import has_denoiser, load_denoiser
    from .exits import EXITS, sample_images
    from .model import NTM

    if final:
        validate.choice(final, EXITS, "--final")
    if device != "cpu":  # the GPU path (ntm_edge/gpu.py): CUDA graphs and autocast
        from .gpu import require_cuda, sample_images_gpu

        require_cuda(device)
        sample_images = functools.partial(sample_images_gpu, log=log)
    model = NTM.from_pretrained(checkpoint, device=device)
    cfg = model.config
    model.vocab.check(prompt)  # an unknown prompt fails here, before any work
    notes: list[str] = []
    denoiser = load_denoiser(checkpoint, device=device) if has_denoiser(checkpoint) else None
    final = validate.exit_for_steps(final, steps, denoiser.config.steps if denoiser else None, notes.append)
    validate.steps_in_training(steps, trained_steps(resolve_checkpoint(checkpoint)), notes.append)
    if cfg.objective != "fm":  # flow matching samples with Euler at any step count
        validate.steps(steps, denoiser.config.t0 if final == "denoiser" and denoiser else cfg.t_min_sample, cfg.shift)
    validate.fits_in_memory(num * cfg.dims, f"--num {num} ({cfg.dims} bytes per image)")
    validate.flush(notes, warn, log)
    start = time.perf_counter()
    images = sample_images(model, [prompt] * num, steps=steps, seed=seed, guidance=guidance, final=final,
                           denoiser=denoiser if final == "denoiser" else None, inverse_method=inverse_method,
                           temperature=temperature)
    elapsed = time.perf_counter() - start
    save_images(images, out, save_array_to, log)
    log(f"wrote {out} ({num} images, {steps} steps, exit {final}, {elapsed:.2f} s)")
    return images
