"""Evaluation: held-out likelihood (exact trajectory NLL and the bits/dim bound, DESIGN.md 4), and the
report of `ntm-edge eval` (likelihood, sample quality under the evaluation classifier, speed)."""

from __future__ import annotations

import time

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
    # the cleanest level must stay below t_1; fine grids (T = 32, 64 for the FM baseline) need a smaller t0
    t_min = min(t_min, 0.5 * float(schedule.time_grid(steps, 0.0, model.config.shift)[1]))
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


def balanced_prompts(class_names, n: int) -> tuple[list[str], np.ndarray]:
    """n prompts cycling through the classes -> (prompts, labels (n,))."""
    labels = np.arange(n) % len(class_names)
    return [class_names[i] for i in labels], labels


def evaluate_checkpoint(checkpoint, steps=(4,), num_samples: int = 500, guidance: float = 0.0, seed: int = 0,
                        dataset: str | None = None, final: str = "inverse", device: str = "cpu", log=print) -> dict:
    """The report of `ntm-edge eval`: per step count, held-out bits/dim (exact trajectory NLL and the
    bound), Frechet distance and prompt accuracy under the evaluation classifier, and images/s."""
    from .checkpoint import trained_on
    from .data import load_dataset
    from .denoiser import load_denoiser
    from .errors import ConfigError
    from .exits import sample_images
    from .metrics import load_or_train_classifier

    if not steps or min(steps) < 1:
        raise ConfigError("--steps must be at least 1")
    model = NTM.from_pretrained(checkpoint, device=device)
    cfg = model.config
    dataset = dataset or trained_on(checkpoint)
    if dataset is None:
        raise ConfigError(f"{checkpoint} does not record its dataset; pass --dataset")
    test = load_dataset(dataset, "test", image_size=cfg.image_size, channels=cfg.channels)
    if tuple(test.class_names) != tuple(cfg.prompt.class_names):
        raise ConfigError(f"{dataset} has classes {test.class_names}, the model {cfg.prompt.class_names}")
    denoiser = load_denoiser(checkpoint, device=device) if final == "denoiser" else None
    clf = load_or_train_classifier(dataset, cfg.image_size, cfg.channels, device=device, log=log)
    prompts, labels = balanced_prompts(cfg.prompt.class_names, num_samples)
    rows = []
    for T in steps:
        row = {"steps": int(T), **heldout_likelihood(model, test.images, test.labels, steps=T, seed=seed)}
        kw = dict(steps=T, seed=seed, guidance=guidance, final=final, denoiser=denoiser)
        row.update(timed_quality(lambda p, kw=kw: sample_images(model, p, **kw), prompts, labels, clf, test.images))
        log(f"T = {T:3d}: {row['bits_per_dim']:.3f} bits/dim, Frechet {row['frechet']:.2f}, "
            f"prompt accuracy {row['prompt_accuracy']:.3f}, {row['images_per_s']:.1f} images/s")
        rows.append(row)
    return {
        "checkpoint": str(checkpoint), "objective": cfg.objective, "dataset": dataset, "final": final,
        "num_samples": num_samples, "guidance": guidance, "seed": seed,
        **real_data_floor(clf, dataset, cfg, num_samples, test.images), "rows": rows,
    }


def timed_quality(sample, prompts, labels, clf, reference) -> dict:
    """images/s of ``sample(prompts) -> uint8 images`` (after a two-prompt warm-up), and the images'
    Frechet distance and prompt accuracy under the evaluation classifier."""
    from .metrics import sample_quality

    sample(prompts[:2])
    start = time.perf_counter()
    images = sample(prompts)
    return {"images_per_s": len(prompts) / (time.perf_counter() - start), **sample_quality(clf, images, labels, reference)}


def real_data_floor(clf, dataset: str, cfg, num_samples: int, reference) -> dict:
    """The classifier's held-out accuracy, and the Frechet distance and accuracy of real training images
    (the floor a sampler is compared with)."""
    from .data import load_dataset
    from .metrics import sample_quality

    train = load_dataset(dataset, "train", image_size=cfg.image_size, channels=cfg.channels)
    floor = sample_quality(clf, train.images[:num_samples], train.labels[:num_samples], reference)
    return {"classifier_heldout_accuracy": clf.heldout_accuracy,
            "real_data": {"frechet": floor["frechet"], "prompt_accuracy": floor["prompt_accuracy"]}}
