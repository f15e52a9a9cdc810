"""Evaluation: held-out likelihood (exact trajectory NLL and the bits/dim bound, docs/design.md 4), and the
report of `ntm-edge eval` (likelihood and sample quality under the evaluation classifier). Speed is not
measured here: a wall-clock figure taken in the middle of an eval is machine-load noise; `ntm-edge bench`
measures it, side by side."""

from __future__ import annotations

import math

import numpy as np
import torch

from . import schedule
from .model import NTM
from .numerics import dequantize


@torch.no_grad()
def heldout_likelihood(model: NTM, images: np.ndarray, labels: np.ndarray, steps: int | None = None,
                       seed: int = 0, batch_size: int = 250, t_min: float | None = None) -> dict:
    """Score forward trajectories of real images (uint8 (N, H, W, C), labels (N,)).

    Returns trajectory nats/dim (the exact NLL of the sampled trajectory, over D = C H W), its terms per
    level (``level_nats_per_dim``, t_0 .. t_T) and bits/dim: the variational bound on -log p(x0) on the
    8-bit scale. Deterministic for a seed.
    ``bits_per_dim_se``: the standard error of that mean over the images (each scored on one trajectory),
    the noise of the figure itself; two models scored with one seed share their draws, so their difference
    is less noisy than this says.
    """
    steps = steps or model.config.steps
    t_min = model.config.t_min_sample if t_min is None else t_min
    # the cleanest level must stay below t_1; fine grids (T = 32, 64 for the FM baseline) need a smaller t0
    t_min = min(t_min, 0.5 * float(schedule.time_grid(steps, 0.0, model.config.shift)[1]))
    g = torch.Generator(device=model.device).manual_seed(seed)
    D = model.config.dims
    total, levels = [], []
    was_training = model.training
    model.eval()
    for i in range(0, len(images), batch_size):
        x0 = dequantize(torch.from_numpy(images[i : i + batch_size]).to(model.device), g)
        traj = model.forward_trajectory(x0, steps, generator=g, t_min=t_min)
        ids = torch.from_numpy(model.vocab.ids_for_labels(labels[i : i + batch_size])).to(model.device)
        terms = model.trajectory_nll(traj, ids, per_level=True)  # (B, T + 1)
        total.append(schedule.sum_levels(terms).double().cpu())
        levels.append(terms.double().cpu())
    model.train(was_training)
    per_image = torch.cat(total) / D  # nats per dim of each image's trajectory
    nats = float(per_image.mean())
    se = float(per_image.std() / math.sqrt(len(per_image))) / math.log(2) if len(per_image) > 1 else float("nan")
    return {
        "steps": steps,
        "t_min": t_min,
        "trajectory_nats_per_dim": nats,
        "bits_per_dim": float(schedule.bound_bits_per_dim(nats, schedule.time_grid(steps, t_min, model.config.shift))),
        "bits_per_dim_se": se,  # the bound is the mean NLL plus a constant: the same standard error, in bits
        "num_images": int(len(images)),
        # the trajectory NLL's terms per level t_0 .. t_T (the step drawing each level; t_T: the N(0, I) top), in
        # nats/dim; they sum to trajectory_nats_per_dim. Between two models scored with one seed (the same
        # trajectories) their differences say which step a likelihood gain is in
        "level_nats_per_dim": [float(v) for v in (torch.cat(levels).mean(0) / D)],
    }


TRANSPORTER_IMAGES = 200  # held-out images the transporter's displacement and log-det are averaged over


@torch.no_grad()
def transporter_activity(model: NTM, images: np.ndarray, steps: int | None = None, seed: int = 0,
                         num_images: int = TRANSPORTER_IMAGES) -> list[dict]:
    """How far f_T is from the identity, per level of the T-step grid (issue 13: a trained transporter
    that stays at the identity leaves the model a Gaussian sampler with a learned scale, unseen).

    Forward trajectories of the first ``num_images`` images (uint8 (N, H, W, C)) on the sampler's grid
    t_0 .. t_T (t_0 = ``config.t_min_sample``); for each level t_k, over the images:
    ``displacement`` = mean ||f_T(x_t) - x_t|| / ||x_t||; ``shape_displacement`` = the part of it that
    is not a uniform rescale, mean ||u - c x|| / ||c x|| with c = <u, x> / <x, x> per image (a transporter
    that only shrinks every image, as the u-space hybrid term taught it, scores 0 here); and
    ``logdet_per_dim`` = mean log|det df_T/dx| / D in nats. All are 0 for f_T = identity (no blocks, or
    blocks at their zero initialisation) and at t = 1, where the gate makes f_T the identity by
    construction. A contextual transporter maps each level given the trajectory's next one (its step's
    x_t). Deterministic for a seed.
    -> [{"t", "displacement", "shape_displacement", "logdet_per_dim"}, ...] ordered t_0 .. t_T.
    """
    steps = steps or model.config.steps
    g = torch.Generator(device=model.device).manual_seed(seed)
    x0 = dequantize(torch.from_numpy(images[:num_images]).to(model.device), g)
    traj = model.forward_trajectory(x0, steps, generator=g)
    B, K = traj.t.shape
    x = traj.x.reshape(B * K, *traj.x.shape[2:])  # (B K, C, H, W)
    was_training = model.training
    model.eval()
    u, logdet = model.transporter_levels(traj)  # a contextual f_T maps each level given the next
    u, logdet = u.reshape(B * K, *u.shape[2:]), logdet.reshape(B * K)
    model.train(was_training)
    u, x = u.flatten(1).double(), x.flatten(1).double()  # (B K, D)
    rel = ((u - x).norm(dim=1) / x.norm(dim=1)).reshape(B, K)  # (B, K)
    scale = (u * x).sum(dim=1, keepdim=True) / (x * x).sum(dim=1, keepdim=True)  # (B K, 1): best c in u ~ c x
    shape = ((u - scale * x).norm(dim=1) / (scale * x).norm(dim=1).clamp_min(1e-12)).reshape(B, K)  # (B, K)
    ld = logdet.reshape(B, K).double() / model.config.dims  # (B, K) nats/dim
    return [{"t": float(traj.t[0, k]), "displacement": float(rel[:, k].mean()),
             "shape_displacement": float(shape[:, k].mean()), "logdet_per_dim": float(ld[:, k].mean())}
            for k in range(K)]


def format_activity(levels: list[dict]) -> str:
    """One log line: t: displacement / log-det per dim, per level."""
    return "  ".join(f"t={r['t']:.3g}: {r['displacement']:.4f} ({r['shape_displacement']:.4f}) / "
                     f"{r['logdet_per_dim']:+.4f}" for r in levels)


def balanced_prompts(class_names, n: int) -> tuple[list[str], np.ndarray]:
    """n prompts cycling through the classes -> (prompts, labels (n,))."""
    labels = np.arange(n) % len(class_names)
    return [class_names[i] for i in labels], labels


def check_eval_options(steps, num_samples: int, guidance: float, seed: int, heldout_images: int | None = None) -> float:
    """The options every eval shares (a checkpoint's or a bundle's), checked before any work -> guidance."""
    from . import validate
    from .errors import ConfigError

    if not steps:
        raise ConfigError("--steps must be given at least once")
    for T in steps:
        validate.count(T, "--steps")
    validate.count(num_samples, "--num-samples", 2)  # a Frechet distance needs a covariance
    if heldout_images is not None:
        validate.count(heldout_images, "--heldout-images", 2)  # a standard error needs two
    validate.seed(seed)
    return validate.guidance(guidance)


def evaluate_checkpoint(checkpoint, steps=(4,), num_samples: int = 500, guidance: float = 0.0, seed: int = 0,
                        dataset: str | None = None, final: str = "inverse", device: str = "cpu", log=print,
                        temperature: float = 1.0, heldout_images: int | None = None) -> dict:
    """The report of `ntm-edge eval`: per step count, held-out bits/dim (exact trajectory NLL and the
    bound; over the first ``heldout_images`` test images, default all), Frechet distance and prompt accuracy
    under the evaluation classifier, and (not for FM) the transporter's displacement and log-det per level of
    the grid (``transporter_activity``)."""
    from . import validate
    from .assets import resolve_checkpoint
    from .checkpoint import trained_on, trained_steps
    from .data import load_dataset
    from .denoiser import load_denoiser
    from .errors import ConfigError
    from .exits import EXITS, sample_images
    from .metrics import load_or_train_classifier
    from .text_eval import paraphrase_report

    guidance = check_eval_options(steps, num_samples, guidance, seed, heldout_images)
    temperature = validate.temperature(temperature)
    validate.choice(final, EXITS, "--final")
    device = validate.torch_device(device)
    model = NTM.from_pretrained(checkpoint, device=device)
    cfg = model.config
    denoiser = load_denoiser(checkpoint, device=device) if final == "denoiser" else None
    for T in steps:  # the sampler's grid (flow matching samples with Euler at any T)
        validate.exit_for_steps(final, T, denoiser.config.steps if denoiser else None)
        if cfg.objective != "fm":
            validate.steps(T, denoiser.config.t0 if denoiser else cfg.t_min_sample, cfg.shift)
    directory = resolve_checkpoint(checkpoint)  # "default": verified once, here
    dataset = dataset or trained_on(directory)
    if dataset is None:
        raise ConfigError(f"{checkpoint} does not record its dataset; pass --dataset")
    trained = trained_steps(directory)
    for T in steps:
        validate.steps_in_training(T, trained, lambda message: log(f"warning: {message}"))
    test = load_dataset(dataset, "test", image_size=cfg.image_size, channels=cfg.channels)
    if tuple(test.class_names) != tuple(cfg.prompt.class_names):
        raise ConfigError(f"{dataset} has classes {test.class_names}, the model {cfg.prompt.class_names}")
    clf = load_or_train_classifier(dataset, cfg.image_size, cfg.channels, device=device, log=log)
    prompts, labels = balanced_prompts(cfg.prompt.class_names, num_samples)
    rows = []
    for T in steps:
        # memory grows with the batch times the T + 1 levels: past T = 64 the batch shrinks to keep it there
        batch = max(1, min(250, 250 * 65 // (T + 1)))
        row = {"steps": int(T), **heldout_likelihood(model, test.images[:heldout_images], test.labels[:heldout_images],
                                                     steps=T, seed=seed, batch_size=batch)}
        kw = dict(steps=T, seed=seed, guidance=guidance, final=final, denoiser=denoiser, temperature=temperature)
        row.update(sampled_quality(lambda p, kw=kw: sample_images(model, p, **kw), prompts, labels, clf, test.images))
        log(f"T = {T:3d}: {row['bits_per_dim']:.3f} (+- {row['bits_per_dim_se']:.3f}) bits/dim, "
            f"Frechet {row['frechet']:.2f}, prompt accuracy {row['prompt_accuracy']:.3f}")
        if cfg.prompt.kind != "label":  # free-form text: the training templates against unseen paraphrases
            row["captions"] = paraphrase_report(model, clf, guidance=guidance, seed=seed, limit=num_samples, steps=T,
                                               final=final, denoiser=denoiser, temperature=temperature)
            log(f"  captions: templates {row['captions']['templates']['accuracy']:.3f}, held-out paraphrases "
                f"{row['captions']['heldout_paraphrases']['accuracy']:.3f}")
        if cfg.objective != "fm":  # FM has no transporter and samples on a grid of its own
            row["transporter"] = transporter_activity(model, test.images, steps=T, seed=seed)
            log(f"  transporter (displacement / log-det per dim, held-out): {format_activity(row['transporter'])}")
            log("  trajectory NLL per level t_0 .. t_T (nats/dim, held-out): "
                + " / ".join(f"{v:+.3f}" for v in row["level_nats_per_dim"]))
        rows.append(row)
    return {
        "checkpoint": str(checkpoint), "objective": cfg.objective, "dataset": dataset, "final": final,
        "num_samples": num_samples, "guidance": guidance, "temperature": temperature, "seed": seed,
        "trained_steps": list(trained) if trained else None,
        **real_data_floor(clf, dataset, cfg, num_samples, test.images), "rows": rows,
    }


def sampled_quality(sample, prompts, labels, clf, reference) -> dict:
    """Frechet distance and prompt accuracy under the evaluation classifier of the images that
    ``sample(prompts) -> uint8 images`` draws. No timing: speed is the job of `ntm-edge bench`."""
    from .metrics import sample_quality

    return sample_quality(clf, sample(prompts), labels, reference)


def real_data_floor(clf, dataset: str, cfg, num_samples: int, reference) -> dict:
    """The classifier's held-out accuracy, and the Frechet distance and accuracy of real training images
    (the floor a sampler is compared with)."""
    from .data import load_dataset
    from .metrics import sample_quality

    train = load_dataset(dataset, "train", image_size=cfg.image_size, channels=cfg.channels)
    floor = sample_quality(clf, train.images[:num_samples], train.labels[:num_samples], reference)
    return {"classifier_heldout_accuracy": clf.heldout_accuracy,
            "real_data": {"frechet": floor["frechet"], "prompt_accuracy": floor["prompt_accuracy"]}}
