"""What `ntm-edge run` and `ntm-edge audit` do, as library functions (the CLI only parses options).

Both load and verify the bundle, run on onnxruntime with the chosen execution provider, and print
plain text: a per-stage latency table for `run` (as the TensorRT diffusion demo prints), the exact
NLL per sample with ``audit``, and the bits/dim bound per image for `audit`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..images import save_array, save_grid
from .audit import image_bound, load_images
from .bundle import NumericsError
from .inversion import DEFAULT_TOL
from .precision import describe
from .sampler import RunResult, StageTimer, generate
from .session import open_runtime


def latency_table(timer: StageTimer, num_images: int, precision: str | None = None) -> str:
    """Per-stage wall-clock time (ms, summed over batches), the pipeline total, images/s and the precision."""
    rows = [(stage, seconds) for stage, seconds in timer.seconds.items() if stage != "total"]
    total = timer.seconds.get("total", sum(s for _, s in rows))
    width = max([len(r[0]) for r in rows] + [len("pipeline")]) + 2
    rule = f"|{'-' * (width + 2)}|{'-' * 14}|"
    lines = [rule, f"| {'stage':^{width}} | {'latency':^12} |", rule]
    lines += [f"| {stage:^{width}} | {1e3 * s:9.2f} ms |" for stage, s in rows]
    lines += [rule, f"| {'pipeline':^{width}} | {1e3 * total:9.2f} ms |", rule,
              f"throughput: {num_images / total:.2f} images/s ({num_images} images)"]
    if precision:
        lines.append(precision)
    return "\n".join(lines)


def run_prompt(bundle, prompt: str, num: int = 16, steps: int = 4, seed: int = 0, guidance: float = 0.0,
               final: str | None = None, inverse_method: str = "jacobi", out="samples.png", save_array_to=None,
               provider: str | None = None, audit: bool = False, unrolled: bool = False, tol: float = DEFAULT_TOL,
               threads: int | None = None, warmup: bool = True, precision: str | None = None, log=print) -> RunResult:
    """`ntm-edge run`: ``num`` images for ``prompt`` on the runtime, written as a PNG grid (and .npy).
    ``precision``: fp32 | fp16 | int8, or None for the best the bundle holds for the provider."""
    if num < 1:
        raise ConfigError("--num must be at least 1")
    rt = open_runtime(bundle, provider, threads, precision)
    rt.bundle.vocab.token_id(prompt)  # an unknown prompt fails here, before any work
    if rt.native and steps == rt.bundle.config.steps:
        unrolled = True  # the native TensorRT backend replays the unrolled four steps as one CUDA graph
    kw = dict(steps=steps, guidance=guidance, final=final, inverse_method=inverse_method, tol=tol, unrolled=unrolled)
    if warmup:  # load the sessions and let the providers allocate: not part of the measured latency
        generate(rt, [prompt], seed=seed, audit=audit, **kw)
    result = generate(rt, [prompt] * num, seed=seed, audit=audit, **kw)
    save_grid(result.images, Path(out))
    if save_array_to:
        save_array(result.images, Path(save_array_to))
    log(f"providers: {', '.join(rt.providers)}; bundle {rt.bundle.root}")
    log(latency_table(result.timer, num, describe(rt.bundle, rt.precision)))
    if result.passes:
        log(f"inverse: {inverse_method}, {' + '.join(map(str, result.passes))} passes per block (last batch)")
    if audit:
        D = rt.bundle.config.dims
        log("exact NLL of each generated trajectory (conditional model):")
        for i, nll in enumerate(result.nll):
            log(f"  sample {i:3d}: {nll:10.2f} nats  ({nll / D:.4f} nats/dim)")
    log(f"wrote {out} ({num} images, {steps} steps, exit {result.final})")
    return result


def audit_images(bundle, image, prompt: str, steps: int | None = None, trajectories: int = 4, seed: int = 0,
                 provider: str | None = None, threads: int | None = None, precision: str | None = "fp32",
                 log=print) -> dict:
    """`ntm-edge audit`: the bits/dim bound on -log p(x0 | prompt) of the image(s) in ``image`` (fp32 unless
    ``precision`` says otherwise: a likelihood is scored at full precision by default)."""
    rt = open_runtime(bundle, provider, threads, precision)
    rt.bundle.vocab.token_id(prompt)
    cfg = rt.bundle.config
    images = load_images(image, cfg.channels)
    if images.shape[1:3] != (cfg.image_size, cfg.image_size):
        raise ConfigError(f"{image} is {images.shape[2]}x{images.shape[1]}; this model scores {cfg.image_size}x"
                          f"{cfg.image_size} images (for a grid from `run`, audit its --save-array .npy instead)")
    report = image_bound(rt, images, [prompt] * len(images), steps, trajectories, seed)
    bits = report["bits_per_dim"]
    if not np.isfinite(bits).all():
        raise NumericsError(f"the audit gave a non-finite bits/dim for {image}: the bundle's graphs overflow on it")
    for i, b in enumerate(np.atleast_1d(bits)):
        log(f"image {i:3d}: {b:.4f} bits/dim (bound, {trajectories} trajectories, T = {report['steps']})")
    if len(images) > 1:
        log(f"mean: {float(np.mean(bits)):.4f} bits/dim over {len(images)} images")
    return report
