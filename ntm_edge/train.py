"""Training by the exact NLL (paper 3.4): end-to-end (all levels of an example in one pass) or
pairwise (one random (t, s) step per example, T drawn from {4, 8, 16}).

AdamW, EMA weights (saved as model.safetensors), gradient clipping, prompt dropout for
classifier-free guidance, atomic periodic checkpoints, and --resume that continues the same run
bit for bit (all randomness comes from one torch.Generator whose state is checkpointed).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import schedule
from .checkpoint import is_checkpoint, load_train_state, save_model, save_train_state
from .config import PRESET_MODES, get_preset
from .data import load_dataset
from .errors import ConfigError, NtmError
from .evaluate import heldout_likelihood
from .model import NTM, dequantize
from .prompts import NULL_ID

MODES = ("end2end", "pairwise")


@dataclass(frozen=True)
class TrainArgs:
    dataset: str = "digits"
    preset: str = "tiny"
    steps: int = 1000
    batch_size: int = 64
    out: str = "runs/ntm"
    mode: str | None = None  # None: the preset's own (config.PRESET_MODES)
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 500
    eval_images: int = 500  # held-out images scored at the end (0: skip)

    def validate(self) -> TrainArgs:
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but torch sees no CUDA device")
        return self


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------


def draw_t_min(cfg, n: int, g: torch.Generator, device) -> torch.Tensor:
    """t_min ~ U[t_min_low, t_min_max] per example, (n,)."""
    return cfg.t_min_low + (cfg.t_min_max - cfg.t_min_low) * torch.rand(n, generator=g, device=device)


def end2end_loss(model: NTM, x0, ids, mask, g: torch.Generator):
    """Trajectory NLL per dim with T = config.steps and a random t_min per example."""
    cfg = model.config
    t_min = draw_t_min(cfg, x0.shape[0], g, x0.device)
    traj = model.forward_trajectory(x0, cfg.steps, generator=g, t_min=t_min)
    nll, x0_hat = model.trajectory_terms(traj, ids, mask)
    mse = (x0_hat - x0[:, None]).pow(2).mean()
    return nll.mean() / cfg.dims, mse


def pairwise_loss(model: NTM, x0, ids, mask, g: torch.Generator):
    """One step per example: T ~ {4, 8, 16}, k ~ U{1..T}, NLL of x_{t_(k-1)} given x_{t_k} per dim."""
    cfg, B, dev = model.config, x0.shape[0], x0.device
    counts = torch.tensor(schedule.STEP_COUNTS, dtype=torch.float32, device=dev)
    T = counts[torch.randint(len(counts), (B,), generator=g, device=dev)]  # (B,)
    k = torch.floor(torch.rand(B, generator=g, device=dev) * T) + 1  # (B,) in 1..T
    t = schedule.shift_time(k / T, cfg.shift)
    t_min = draw_t_min(cfg, B, g, dev)
    s = torch.where(k == 1, t_min, schedule.shift_time((k - 1) / T, cfg.shift))
    view = (B, 1, 1, 1)
    x_s = (1 - s).view(view) * x0 + s.view(view) * torch.randn(x0.shape, generator=g, device=dev)
    a, b = schedule.markov_coeffs(s.view(view), t.view(view))
    x_t = a * x_s + b * torch.randn(x0.shape, generator=g, device=dev)
    u, logdet = model.transporter(torch.cat([x_s, x_t]), torch.cat([s, t]), torch.cat([T, T]))
    nll, x0_hat = model.step_terms(u[:B], logdet[:B], u[B:], s, t, T, ids, mask)
    return nll.mean() / cfg.dims, (x0_hat - x0).pow(2).mean()


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def _ema_update(ema: NTM, model: NTM, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)


def _lr_at(args: TrainArgs, step: int) -> float:
    return args.lr * min(1.0, (step + 1) / max(1, args.warmup))


def _save(out: Path, model, ema, opt, g, step, args, history) -> None:
    save_train_state(out, {
        "step": step, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
        "generator": g.get_state(), "args": dataclasses.asdict(args), "config": model.config.to_dict(),
        "history": history,
    })
    save_model(ema, out, step=step)  # the EMA weights are the ones to sample from


def train(args: TrainArgs, resume: bool = False, progress: bool = True, log=print, log_every: int = 100) -> dict:
    """Run (or continue) a training run; returns a summary (final loss, held-out likelihood).

    With ``progress`` a rich progress bar shows the loss; without it (no terminal: CI, nohup) a
    plain line is logged every ``log_every`` steps.
    """
    from .config import NTMConfig

    args = args.validate()
    out = Path(args.out)
    if is_checkpoint(out) and not resume:
        raise NtmError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    state = load_train_state(out) if resume else None
    if state is not None:
        old = state["args"]
        if (old["dataset"], old["preset"]) != (args.dataset, args.preset):
            raise ConfigError(
                f"{out} was trained on {old['dataset']!r} with preset {old['preset']!r}; "
                "resume it with the same --dataset and --preset"
            )
    preset = get_preset(args.preset)
    mode = args.mode or PRESET_MODES[args.preset]
    data = load_dataset(args.dataset, "train", image_size=preset.image_size, seed=0)
    config = NTMConfig.from_dict(state["config"]) if state else preset.with_data(data.channels, data.class_names)
    if config.prompt.class_names != data.class_names:
        raise ConfigError(f"{args.dataset} has classes {data.class_names}, the checkpoint {config.prompt.class_names}")

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = NTM(config).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    g = torch.Generator(device=device).manual_seed(args.seed)
    step, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        step, history = state["step"], state["history"]
        log(f"resuming {out} at step {step}")
    if step >= args.steps:
        raise ConfigError(f"{out} is already at step {step}; pass a larger --steps to continue it")

    images = torch.from_numpy(data.images).to(device)  # (N, H, W, C) uint8
    ids_all = torch.from_numpy(data.labels + 1).to(device)  # label k -> prompt id k + 1
    loss_fn = end2end_loss if mode == "end2end" else pairwise_loss
    n_params = sum(p.numel() for p in model.parameters())
    log(f"training {args.preset} ({n_params / 1e6:.2f}M params, {mode}) on {args.dataset} "
        f"({len(data)} images) for steps {step}..{args.steps}")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeRemainingColumn(), disable=not progress)
    start, loss_avg = time.time(), None
    try:
        with bar:
            task = bar.add_task("train", total=args.steps, completed=step, info="")
            while step < args.steps:
                idx = torch.randint(len(images), (args.batch_size,), generator=g, device=device)
                x0 = dequantize(images[idx], g)
                drop = torch.rand(args.batch_size, generator=g, device=device) < config.prompt_dropout
                ids = torch.where(drop, NULL_ID, ids_all[idx])[:, None]  # (B, 1)
                mask = torch.ones_like(ids, dtype=torch.bool)
                nll, mse = loss_fn(model, x0, ids, mask, g)
                loss = nll + config.x0_mse_weight * mse
                if not torch.isfinite(loss):
                    raise NtmError(f"the loss became {loss.item()} at step {step}; lower --lr (last checkpoint kept)")
                for group in opt.param_groups:
                    group["lr"] = _lr_at(args, step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                opt.step()
                _ema_update(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
                step += 1
                v = nll.item()
                loss_avg = v if loss_avg is None else 0.98 * loss_avg + 0.02 * v
                if step % 50 == 0 or step == args.steps:
                    history.append({"step": step, "nll_nats_per_dim": loss_avg, "mse": mse.item(),
                                    "seconds": time.time() - start})
                bar.update(task, completed=step, info=f"nll {loss_avg:.4f} nats/dim")
                if not progress and (step % log_every == 0 or step == args.steps):
                    log(f"step {step}/{args.steps}  nll {loss_avg:.4f} nats/dim  {time.time() - start:.0f} s")
                if step % args.checkpoint_every == 0 and step < args.steps:
                    _save(out, model, ema, opt, g, step, args, history)
    except KeyboardInterrupt:
        _save(out, model, ema, opt, g, step, args, history)
        log(f"interrupted at step {step}; checkpoint saved to {out}; continue with --resume")
        raise
    _save(out, model, ema, opt, g, step, args, history)
    summary = {"step": step, "mode": mode, "train_nll_nats_per_dim": loss_avg,
               "seconds": time.time() - start, "params": n_params}
    if args.eval_images > 0:
        test = load_dataset(args.dataset, "test", image_size=preset.image_size, seed=0)
        n = min(args.eval_images, len(test))
        summary["heldout"] = heldout_likelihood(ema, test.images[:n], test.labels[:n])
        log(f"held-out ({n} images, T = {ema.config.steps}): "
            f"{summary['heldout']['bits_per_dim']:.3f} bits/dim (bound), "
            f"trajectory NLL {summary['heldout']['trajectory_nats_per_dim']:.4f} nats/dim")
    log(f"saved {out} at step {step} ({summary['seconds']:.0f} s)")
    return summary

