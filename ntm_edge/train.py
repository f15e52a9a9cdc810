"""The training loop: exact-NLL training of an NTM (paper 3.4), its baselines (objective "gaussian",
"fm"), and finetuning an NTM from a flow-matching checkpoint (paper 3.6-3.8).

AdamW, EMA weights (saved as model.safetensors), gradient clipping, prompt dropout for
classifier-free guidance, atomic periodic checkpoints, an optional wall-clock budget (to compare
objectives at equal cost), and --resume that continues the same run bit for bit (all randomness
comes from one torch.Generator whose state is checkpointed). The objectives live in losses.py.

Nothing is lost: the output directory is checked (a directory, writable, room for a checkpoint)
before step 1; SIGINT and SIGTERM end the current step, save and stop (exit 130 / 143,
interrupts.py), so an interrupted run resumes exactly as an uninterrupted one continues; a save that
fails (a full disk) keeps the previous checkpoint and stops the run with one line.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .captions import all_captions, caption_table
from .checkpoint import (
    check_tensors,
    finish_interrupted,
    is_checkpoint,
    load_config,
    load_train_state,
    save_training_checkpoint,
)
from .config import OBJECTIVES, PRESET_MODES, PRESET_TEXT_ENCODERS, NTMConfig, get_preset
from .data import load_dataset
from .errors import CheckpointError, ConfigError, NtmError
from .evaluate import heldout_likelihood
from .fileio import output_dir_problem, remove_stale_temporaries
from .interrupts import Interrupted, StopSignals, signal_name
from .losses import loss_function
from .model import NTM
from .numerics import dequantize

MODES = ("end2end", "pairwise")
TEXT_ENCODERS = {"minilm": "minilm", "labels": "label"}  # --text-encoder -> PromptConfig.kind


@dataclass(frozen=True)
class TrainArgs:
    dataset: str = "digits"
    preset: str = "tiny"
    steps: int = 1000
    batch_size: int = 64
    out: str = "runs/ntm"
    mode: str | None = None  # None: the preset's own (config.PRESET_MODES)
    objective: str = "ntm"  # ntm | gaussian | fm
    init_from: str | None = None  # a flow-matching checkpoint to finetune from (paper 3.6)
    align_weight: float = 2.5  # lambda of the mean-alignment loss when finetuning, cosine-decayed
    x0_mse_weight: float | None = None  # the hybrid x0-MSE term's weight (None: the preset's)
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 500
    time_budget: float | None = None  # stop after this many seconds of training (equal-budget comparisons)
    eval_images: int = 500  # held-out images scored at the end (0: skip)
    text_encoder: str | None = None  # "minilm" | "labels" (None: the preset's, config.PRESET_TEXT_ENCODERS)

    def validate(self) -> TrainArgs:
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}; choose one of: {', '.join(OBJECTIVES)}")
        if self.init_from and self.objective == "fm":
            raise ConfigError("--init-from finetunes an NTM (or Gaussian) model from flow matching; drop --objective fm")
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but torch sees no CUDA device")
        get_preset(self.preset)
        if self.text_encoder not in (None, *TEXT_ENCODERS):
            raise ConfigError(f"unknown --text-encoder {self.text_encoder!r}; choose one of: {', '.join(TEXT_ENCODERS)}")
        return self


def finetune_config(fm: NTMConfig, preset: NTMConfig, objective: str) -> NTMConfig:
    """An NTM (or Gaussian) config around a flow-matching predictor (paper 3.6): the FM network is read
    as acting on u-space (still conditioned on t alone), a fresh transporter (identity at start) and
    a log-scale residual d that starts at zero: at step 0 this model is the FM posterior sampler."""
    if fm.objective != "fm":
        raise ConfigError(f"--init-from needs a flow-matching checkpoint (objective 'fm'), got {fm.objective!r}")
    ntm = objective == "ntm"
    transporter = preset.transporter if ntm else dataclasses.replace(preset.transporter, num_blocks=0)
    predictor = dataclasses.replace(fm.predictor, learn_scale=ntm)
    return dataclasses.replace(fm, objective=objective, transporter=transporter, predictor=predictor,
                               x0_mse_weight=preset.x0_mse_weight).validate()


def _init_from_fm(model: NTM, fm_dir) -> NTM:
    """Copy the FM predictor and prompt encoder into ``model``; return the frozen FM teacher."""
    teacher = NTM.from_pretrained(fm_dir, device=str(model.device)).requires_grad_(False)
    for name in ("predictor", "prompt_encoder"):
        getattr(model, name).load_state_dict(getattr(teacher, name).state_dict())
    return teacher


def prompt_sampler(model: NTM, labels: torch.Tensor, class_names, dropout: float, g: torch.Generator,
                   captions=None):
    """-> draw(idx) -> ids, mask (B, P): the training prompts of examples ``idx``, '' with probability
    ``dropout`` (classifier-free guidance). A label model reads its class token; a text model a fresh
    caption per example per step (drawn with ``g``, so --resume stays bit-exact) from the table of all
    captions, tokenised once (the encoder embeds each one once): the dataset's own ``captions`` (per
    example) when it has them, else the templates filled with the example's class name."""
    device = labels.device
    null_ids, null_mask = model.null_prompt(1)
    if model.config.prompt.kind == "label":
        ids_all = labels + 1  # label k -> prompt id k + 1

        def draw_label(idx):
            drop = torch.rand(len(idx), generator=g, device=device) < dropout
            ids = torch.where(drop, null_ids[0, 0], ids_all[idx])[:, None]  # (B, 1)
            return ids, torch.ones_like(ids, dtype=torch.bool)

        return draw_label
    own = captions is not None  # owner of a table row: the example itself, or its class
    table = caption_table(model.vocab, captions if own else all_captions(class_names))
    owner = torch.arange(len(labels), device=device) if own else labels
    ids_t, mask_t = (torch.from_numpy(a).to(device) for a in (table.ids, table.mask))  # (N, P)
    start, count = (torch.from_numpy(a).to(device) for a in (table.start, table.count))  # (K,)
    # embed every distinct caption and '' now, in fixed chunks: the encoder's float results depend on
    # the batch a row is embedded in, so embedding rows as steps first draw them would break --resume
    distinct = torch.unique(torch.cat([ids_t, null_ids.to(device)]), dim=0)  # sorted: the same in every run
    for i in range(0, len(distinct), 256):
        model.prompt_encoder(distinct[i : i + 256])

    def draw_caption(idx):
        drop = torch.rand(len(idx), generator=g, device=device) < dropout
        k = owner[idx]
        pick = torch.rand(len(idx), generator=g, device=device)
        row = start[k] + (pick * count[k]).long().clamp_max(count[k] - 1)  # (B,)
        ids = torch.where(drop[:, None], null_ids.to(device), ids_t[row])  # (B, P)
        return ids, torch.where(drop[:, None], null_mask.to(device), mask_t[row])

    return draw_caption


def _ema_update(ema: NTM, model: NTM, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)


def _lr_at(args: TrainArgs, step: int) -> float:
    return args.lr * min(1.0, (step + 1) / max(1, args.warmup))


def _align_weight_at(args: TrainArgs, step: int) -> float:
    """lambda, cosine-decayed from align_weight to 0 over the run (paper 3.7)."""
    return args.align_weight * 0.5 * (1.0 + math.cos(math.pi * min(step / args.steps, 1.0)))


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """What one training checkpoint of ``model`` takes on disk, about: train_state.pt holds the raw
    weights, the EMA weights and AdamW's two moments, model.safetensors the EMA weights once more; a
    save writes all of it before the previous files are replaced. Plus 1 MB for the rest."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 5 * weights + (1 << 20)


def _save(out: Path, model, ema, opt, g, step, args, history, loss_avg, saved_step) -> int:
    """Save a checkpoint of ``step``; returns ``step``. An OSError (a full disk) is one NtmError,
    and the checkpoint of ``saved_step`` stays as it was."""
    state = {
        "step": step, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
        "generator": g.get_state(), "args": dataclasses.asdict(args), "config": model.config.to_dict(),
        "history": history, "loss_avg": loss_avg,
    }
    info = {"dataset": args.dataset, "preset": args.preset, "objective": model.config.objective}
    try:
        save_training_checkpoint(ema, out, state, info)  # the EMA weights are the ones to sample from
    except OSError as e:
        kept = f"the checkpoint of step {saved_step} is kept" if saved_step is not None else "nothing was saved"
        raise NtmError(f"cannot save step {step} to {out}: {e.strerror or e}; {kept}") from None
    return step


def _restore(out: Path, state: dict, model, ema, opt, g) -> None:
    """Load a train state into the fresh modules; a state that does not fit is one CheckpointError."""
    check_tensors(state["model"], model.state_dict(), out / "train_state.pt")
    check_tensors(state["ema"], ema.state_dict(), out / "train_state.pt")
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    try:
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{out / 'train_state.pt'} does not fit this model ({str(e).splitlines()[0]})") from None


def _check_resume(out: Path, args: TrainArgs, state: dict) -> None:
    old = {**dataclasses.asdict(TrainArgs()), **state["args"]}  # older states lack newer fields
    for key in ("dataset", "preset", "objective", "init_from"):
        if old[key] != getattr(args, key):
            raise ConfigError(f"{out} was trained with --{key.replace('_', '-')} {old[key]!r}; "
                              f"resume it with the same value (got {getattr(args, key)!r})")


def train(args: TrainArgs, resume: bool = False, progress: bool = True, log=print, log_every: int = 100) -> dict:
    """Run (or continue) a training run; returns a summary (final loss, held-out likelihood).

    With ``progress`` a rich progress bar shows the loss; without it (no terminal: CI, nohup) a
    plain line is logged every ``log_every`` steps. SIGINT and SIGTERM are caught from the start:
    one that arrives while the run loads (or completes a killed run's save) stops it before step
    one like one during training, with a checkpoint and exit status 130 / 143.
    """
    stop = StopSignals()
    with stop:
        return _train(args, resume, progress, log, log_every, stop)


def _train(args: TrainArgs, resume: bool, progress: bool, log, log_every: int, stop: StopSignals) -> dict:
    args = args.validate()
    out = Path(args.out)
    problem = output_dir_problem(out)
    if problem:
        raise NtmError(problem)
    if finish_interrupted(out):
        log(f"completed the save that a killed run left half renamed in {out}")
    if is_checkpoint(out) and not resume:
        raise NtmError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    removed = remove_stale_temporaries(out)
    if removed:
        log(f"removed {len(removed)} temporary file(s) that a killed run left in {out}")
    state = load_train_state(out) if resume else None
    if state is not None:
        _check_resume(out, args, state)
    preset = get_preset(args.preset)
    if state is not None:
        config = NTMConfig.from_dict(state["config"])
    elif args.init_from:
        config = finetune_config(load_config(args.init_from), preset, args.objective)
    else:
        config = None
    image_size = config.image_size if config else preset.image_size
    data = load_dataset(args.dataset, "train", image_size=image_size, seed=0)
    if config is None:
        kind = TEXT_ENCODERS[args.text_encoder] if args.text_encoder else PRESET_TEXT_ENCODERS[args.preset]
        config = preset.with_data(data.channels, data.class_names).with_text_encoder(kind).for_objective(args.objective)
        if args.x0_mse_weight is not None:
            config = dataclasses.replace(config, x0_mse_weight=args.x0_mse_weight)
    if config.prompt.class_names != data.class_names:
        raise ConfigError(f"{args.dataset} has classes {data.class_names}, the model {config.prompt.class_names}")
    mode = args.mode or PRESET_MODES[args.preset]

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = NTM(config).to(device).train()
    teacher = _init_from_fm(model, args.init_from) if args.init_from else None
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    g = torch.Generator(device=device).manual_seed(args.seed)
    step, history, loss_avg, saved_step = 0, [], None, None
    if state is not None:
        _restore(out, state, model, ema, opt, g)
        step, history, loss_avg = state["step"], state["history"], state.get("loss_avg")
        saved_step = step
        log(f"resuming {out} at step {step}")
    if step >= args.steps:
        raise ConfigError(f"{out} is already at step {step}; pass a larger --steps to continue it")
    problem = output_dir_problem(out, checkpoint_bytes(model))
    if problem:
        raise NtmError(problem)

    images = torch.from_numpy(data.images).to(device)  # (N, H, W, C) uint8
    draw_prompts = prompt_sampler(model, torch.from_numpy(data.labels).to(device), data.class_names,
                                  config.prompt_dropout, g, data.captions)
    loss_fn = loss_function(config.objective, mode)
    unit = "mse" if config.objective == "fm" else "nats/dim"
    n_params = sum(p.numel() for p in model.parameters())
    log(f"training {args.preset} {config.objective} ({n_params / 1e6:.2f}M params, "
        f"{'velocity MSE' if config.objective == 'fm' else mode}) on {args.dataset} ({len(data)} images) "
        f"for steps {step}..{args.steps}" + (f", finetuning from {args.init_from}" if args.init_from else ""))

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeRemainingColumn(), disable=not progress)
    start = time.time()
    save = functools.partial(_save, out, model, ema, opt, g, args=args, history=history)
    try:
        with bar:
            task = bar.add_task("train", total=args.steps, completed=step, info="")
            while step < args.steps and not stop.requested:
                if args.time_budget is not None and time.time() - start >= args.time_budget:
                    log(f"time budget of {args.time_budget:.0f} s reached at step {step}")
                    break
                idx = torch.randint(len(images), (args.batch_size,), generator=g, device=device)
                x0 = dequantize(images[idx], g)
                ids, mask = draw_prompts(idx)  # (B, P)
                losses = loss_fn(model, x0, ids, mask, g, teacher)
                loss = losses.total(config.x0_mse_weight, _align_weight_at(args, step))
                if not torch.isfinite(loss):
                    kept = f"the checkpoint of step {saved_step} is kept" if saved_step is not None else "nothing saved"
                    raise NtmError(f"the loss became {loss.item()} at step {step}; lower --lr ({kept})")
                for group in opt.param_groups:
                    group["lr"] = _lr_at(args, step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                opt.step()
                _ema_update(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
                step += 1
                v = losses.main.item()
                loss_avg = v if loss_avg is None else 0.98 * loss_avg + 0.02 * v
                if step % 50 == 0 or step == args.steps:
                    history.append({"step": step, "loss": loss_avg, "x0_mse": losses.x0_mse.item(),
                                    "seconds": time.time() - start})
                bar.update(task, completed=step, info=f"loss {loss_avg:.4f} {unit}")
                if not progress and (step % log_every == 0 or step == args.steps):
                    log(f"step {step}/{args.steps}  loss {loss_avg:.4f} {unit}  {time.time() - start:.0f} s")
                if step % args.checkpoint_every == 0 and step < args.steps:
                    with stop.hold():
                        saved_step = save(step, loss_avg=loss_avg, saved_step=saved_step)
            with stop.hold():
                if saved_step != step:
                    saved_step = save(step, loss_avg=loss_avg, saved_step=saved_step)
    except Interrupted as e:  # a second signal, mid-step: nothing of this step is saved
        log(f"stopped by a second {signal_name(e.signum)} at step {step} without saving"
            + (f"; {out} keeps step {saved_step}" if saved_step is not None else ""))
        raise
    if stop.requested:
        log(f"interrupted by {signal_name(stop.received)} at step {step}; checkpoint saved to {out}; "
            "continue with --resume")
        raise Interrupted(stop.received, saved=True)
    summary: dict = {"step": step, "mode": mode, "objective": config.objective, "train_loss": loss_avg,
               "seconds": time.time() - start, "params": n_params}
    if args.eval_images > 0:
        test = load_dataset(args.dataset, "test", image_size=image_size, seed=0)
        n = min(args.eval_images, len(test))
        summary["heldout"] = heldout_likelihood(ema, test.images[:n], test.labels[:n])
        log(f"held-out ({n} images, T = {ema.config.steps}): "
            f"{summary['heldout']['bits_per_dim']:.3f} bits/dim (bound), "
            f"trajectory NLL {summary['heldout']['trajectory_nats_per_dim']:.4f} nats/dim")
    log(f"saved {out} at step {step} ({summary['seconds']:.0f} s)")
    return summary
