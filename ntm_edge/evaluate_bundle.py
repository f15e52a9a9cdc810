"""`ntm-edge eval --bundle B --precision P`: a bundle judged by the same eval as a checkpoint.

The same report as ``evaluate.evaluate_checkpoint`` (held-out bits/dim, Frechet distance and prompt
accuracy under the same evaluation classifier), with the samples drawn and the held-out
images scored by the torch-free runtime at the chosen precision. Held-out bits/dim: one forward
trajectory per test image (the checkpoint eval draws one too, from torch's generator, so the two
agree to sampling noise, not bit for bit).
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError


def evaluate_bundle(bundle, precision: str | None = "fp32", steps=(4,), num_samples: int = 500, guidance: float = 0.0,
                    seed: int = 0, dataset: str | None = None, final: str = "inverse", provider: str | None = "cpu",
                    threads: int | None = None, log=print, temperature: float = 1.0,
                    heldout_images: int | None = None) -> dict:
    """The eval report of a bundle at one precision (None or "auto": the runtime's default); its held-out
    bits/dim over the first ``heldout_images`` test images (default all)."""
    from . import validate
    from .data import load_dataset
    from .evaluate import balanced_prompts, check_eval_options, real_data_floor, sampled_quality
    from .metrics import load_or_train_classifier
    from .runtime.audit import image_bound
    from .runtime.precision import describe
    from .runtime.sampler import generate
    from .runtime.session import open_runtime
    from .runtime.specs import DENOISER

    guidance = check_eval_options(steps, num_samples, guidance, seed, heldout_images)
    temperature = validate.temperature(temperature)
    if final not in ("inverse", "denoiser"):
        raise ConfigError(f"a bundle leaves u-space by 'inverse' or 'denoiser', not {final!r} (score denoising needs torch)")
    rt = open_runtime(bundle, provider, threads, precision)
    cfg = rt.bundle.config
    den = rt.bundle.denoiser if final == "denoiser" and rt.has(DENOISER) else None
    for T in steps:  # the sampler's grid, as for a checkpoint
        validate.exit_for_steps(final, T, den["steps"] if den else None)
        validate.steps(T, den["t0"] if den else cfg.t_min_sample, cfg.shift)
    dataset = dataset or rt.bundle.manifest["source"].get("dataset")
    if dataset is None:
        raise ConfigError(f"{bundle} does not record its dataset; pass --dataset")
    for T in steps:
        validate.steps_in_training(T, rt.bundle.manifest["schedule"].get("trained_steps"),
                                   lambda message: log(f"warning: {message}"))
    test = load_dataset(dataset, "test", image_size=cfg.image_size, channels=cfg.channels)
    if tuple(test.class_names) != tuple(cfg.prompt.class_names):
        raise ConfigError(f"{dataset} has classes {test.class_names}, the model {cfg.prompt.class_names}")
    clf = load_or_train_classifier(dataset, cfg.image_size, cfg.channels, log=log)
    prompts, labels = balanced_prompts(cfg.prompt.class_names, num_samples)
    scored = test.images[:heldout_images]
    scored_prompts = [cfg.prompt.class_names[k] for k in test.labels[:heldout_images]]
    log(describe(rt.bundle, rt.precision))
    rows = []
    for T in steps:
        bound = image_bound(rt, scored, scored_prompts, steps=T, trajectories=1, seed=seed)
        per_image = np.asarray(bound["bits_per_dim"], dtype=np.float64)
        row = {"steps": int(T), "bits_per_dim": float(per_image.mean()),
               "bits_per_dim_se": float(per_image.std(ddof=1) / np.sqrt(len(per_image))) if len(per_image) > 1
               else float("nan"),  # as evaluate.heldout_likelihood's: the noise of the mean over the images
               "trajectory_nats_per_dim": float(np.mean(bound["trajectory_nats_per_dim"])), "t_min": bound["t_min"],
               "num_images": int(len(scored))}
        kw = dict(steps=T, seed=seed, guidance=guidance, final=final, temperature=temperature)
        row.update(sampled_quality(lambda p, kw=kw: generate(rt, p, **kw).images, prompts, labels, clf, test.images))
        log(f"T = {T:3d}: {row['bits_per_dim']:.3f} (+- {row['bits_per_dim_se']:.3f}) bits/dim, "
            f"Frechet {row['frechet']:.2f}, prompt accuracy {row['prompt_accuracy']:.3f} ({rt.precision})")
        rows.append(row)
    return {
        "bundle": str(bundle), "precision": rt.precision, "providers": rt.providers, "objective": cfg.objective,
        "dataset": dataset, "final": final, "num_samples": num_samples, "guidance": guidance,
        "temperature": temperature, "seed": seed,
        **real_data_floor(clf, dataset, cfg, num_samples, test.images), "rows": rows,
    }
