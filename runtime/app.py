"""What `ntm-edge run` and `ntm-edge audit` do, as library functions (the CLI only parses options).

Both load and verify the bundle, run on onnxruntime with the chosen execution provider, and print
plain text: a per-stage latency table for `run` (as the TensorRT diffusion demo prints), the exact
NLL per sample with ``audit``, and the bits/dim bound per image for `audit`.
"""

from __future__ import annotations

import numpy as np

from ntm_edge import validate
from ntm_edge.decoding import DEFAULT_METHOD, DEFAULT_TOL, METHODS
from ntm_edge.errors import ConfigError
from ntm_edge.images import save_images

from .audit import image_bound, load_images
from .bundle import NumericsError
from .default_model import default_bundle
from .precision import describe
from .sampler import FINALS, RunResult, StageTimer, check_options, generate
from .session import open_runtime
from .specs import DENOISER, SAMPLER_LOOP


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
               final: str | None = None, inverse_method: str = DEFAULT_METHOD, out="samples.png", save_array_to=None,
               provider: str | None = None, audit: bool = False, unrolled: bool = False, segments=1,
               tol=DEFAULT_TOL, max_iters=None, threads: int | None = None, warmup: bool = True,
               precision: str | None = None, log=print, warn=None, temperature: float = 1.0) -> RunResult:
    """`ntm-edge run`: ``num`` images for ``prompt`` on the runtime, written as an image grid (and .npy).

    ``bundle`` None: the default model shipped in the package (``default_model.default_bundle``: assembled
    in the cache on first use, after the options are checked).
    ``precision``: fp32 | fp16 | int8, or None for the best the bundle holds for the provider. Every
    option, output path and the bundle are checked before the sampler runs; warnings (``warn``,
    default: a ``warning:`` line through ``log``) come after all checks have passed.
    """
    notes: list[str] = []
    validate.count(num, "--num")
    validate.count(steps, "--steps")
    validate.seed(seed)
    guidance = validate.guidance(guidance)
    temperature = validate.temperature(temperature)
    if final:
        validate.choice(final, FINALS, "--final")
    validate.choice(inverse_method, METHODS, "--inverse-method")
    out = validate.image_path(out)
    if save_array_to:
        save_array_to = validate.array_path(save_array_to)
    threads = validate.threads(threads, warn=notes.append)
    if bundle is None:
        bundle = default_bundle(log=log)
    rt = open_runtime(bundle, provider, threads, precision)
    rt.bundle.vocab.check(prompt)  # an unknown prompt fails here, before any work
    cfg, den = rt.bundle.config, rt.bundle.denoiser if rt.has(DENOISER) else None
    final = validate.exit_for_steps(final, steps, den["steps"] if den else None, notes.append)
    validate.steps_in_training(steps, rt.bundle.manifest["schedule"].get("trained_steps"), notes.append)
    validate.steps(steps, den["t0"] if final == "denoiser" and den else cfg.t_min_sample, cfg.shift)
    if rt.native and steps == rt.bundle.config.steps and SAMPLER_LOOP in rt.bundle.graphs:
        unrolled = True  # the native TensorRT backend replays the unrolled four steps as one CUDA graph
    check_options(rt, steps, guidance, final, unrolled)
    # what the result keeps: uint8 images, float32 x0 and the T + 1 float32 levels of every trajectory
    validate.fits_in_memory(num * cfg.dims * (1 + 4 + 4 * (steps + 1)), f"--num {num} at --steps {steps}")
    validate.flush(notes, warn, log)
    kw = dict(steps=steps, guidance=guidance, final=final, inverse_method=inverse_method, segments=segments, tol=tol,
              max_iters=max_iters, unrolled=unrolled, temperature=temperature)
    # overflow (a huge --guidance) is reported once, as a NumericsError from the sampler's own check
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if warmup:  # load the sessions and let the providers allocate: not part of the measured latency
            generate(rt, [prompt], seed=seed, audit=audit, **kw)
        result = generate(rt, [prompt] * num, seed=seed, audit=audit, **kw)
    save_images(result.images, out, save_array_to, log)
    log(f"providers: {', '.join(rt.providers)}; bundle {rt.bundle.root}")
    log(latency_table(result.timer, num, describe(rt.bundle, rt.precision)))
    if result.report is not None and result.report.iterations:
        passes = " + ".join(map(str, result.report.block_iterations))
        log(f"inverse: {inverse_method}, {passes} passes per block (last batch)")
    if audit:
        D = rt.bundle.config.dims
        log("exact NLL of each generated trajectory (conditional model):")
        for i, nll in enumerate(result.nll if result.nll is not None else ()):
            log(f"  sample {i:3d}: {nll:10.2f} nats  ({nll / D:.4f} nats/dim)")
    log(f"wrote {out} ({num} images, {steps} steps, exit {result.final})")
    return result


def audit_images(bundle, image, prompt: str, steps: int | None = None, trajectories: int = 4, seed: int = 0,
                 provider: str | None = None, threads: int | None = None, precision: str | None = "fp32",
                 log=print, warn=None) -> dict:
    """`ntm-edge audit`: the bits/dim bound on -log p(x0 | prompt) of the image(s) in ``image``.
    ``steps``: None is the model's T; any other value is checked against the schedule's limit. fp32 unless
    ``precision`` says otherwise: a likelihood is scored at full precision by default."""
    notes: list[str] = []
    validate.count(trajectories, "--trajectories")
    validate.seed(seed)
    if steps is not None:
        validate.count(steps, "--steps")
    threads = validate.threads(threads, warn=notes.append)
    rt = open_runtime(bundle, provider, threads, precision)
    rt.bundle.vocab.check(prompt)
    cfg = rt.bundle.config
    steps = cfg.steps if steps is None else validate.steps(steps, cfg.t_min_sample, cfg.shift)
    validate.steps_in_training(steps, rt.bundle.manifest["schedule"].get("trained_steps"), notes.append)
    images = load_images(image, cfg.channels)
    if images.shape[1:3] != (cfg.image_size, cfg.image_size):
        raise ConfigError(f"{image} is {images.shape[2]}x{images.shape[1]}; this model scores {cfg.image_size}x"
                          f"{cfg.image_size} images (for a grid from `run`, audit its --save-array .npy instead)")
    validate.flush(notes, warn, log)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # non-finite scores are checked below
        report = image_bound(rt, images, [prompt] * len(images), steps, trajectories, seed)
    bits = report["bits_per_dim"]
    if not np.isfinite(bits).all():
        raise NumericsError(f"the audit gave a non-finite bits/dim for {image}: the bundle's graphs overflow on it")
    for i, b in enumerate(np.atleast_1d(bits)):
        log(f"image {i:3d}: {b:.4f} bits/dim (bound, {trajectories} trajectories, T = {report['steps']})")
    if len(images) > 1:
        log(f"mean: {float(np.mean(bits)):.4f} bits/dim over {len(images)} images")
    return report
