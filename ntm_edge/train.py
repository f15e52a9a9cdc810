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

Under torchrun the same loop runs on every rank (distributed.py): DDP, or FSDP2 for the large
presets, a global batch of --batch-size x ranks x --grad-accum, rank 0 alone logging and saving. On
GPU the forward and backward run under bf16 autocast; the model's fp32 islands (norms, exp,
log-dets, the Gaussian NLL) upcast themselves and stay fp32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import validate
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
from .distributed import (
    World,
    accumulate,
    from_main,
    full,
    join,
    micro_generator,
    reporting,
    shard_like,
    wrap,
)
from .errors import CheckpointError, ConfigError, NtmError
from .evaluate import heldout_likelihood
from .fileio import output_dir_problem, remove_stale_temporaries
from .interrupts import Interrupted, StopSignals, signal_name
from .losses import X0_SPACES, loss_function
from .model import NTM
from .numerics import dequantize
from .schedule import STEP_COUNTS, scoring_step_count, trained_step_counts

MODES = ("end2end", "pairwise")
# TransporterConfig field -> the TrainArgs field (and `train` option, with dashes) that overrides it
_TRANSPORTER_ARGS = {"num_blocks": "transporter_blocks", "patch_size": "transporter_patch",
                     "layers_per_block": "transporter_layers", "width": "transporter_width",
                     "context": "transporter_context"}
PARALLEL = ("auto", "ddp", "fsdp")  # auto: FSDP2 for SHARDED_PRESETS, DDP otherwise (under torchrun)
SHARDED_PRESETS = ("base",)
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on CUDA, fp32 on CPU
TEXT_ENCODERS = {"minilm": "minilm", "labels": "label"}  # --text-encoder -> PromptConfig.kind


@dataclass(frozen=True)
class TrainArgs:
    dataset: str = "digits"
    preset: str = "tiny"
    steps: int = 1000
    batch_size: int = 64
    out: str = "runs/ntm"
    mode: str | None = None  # None: the preset's own (config.PRESET_MODES)
    # pairwise mode: the step counts T is drawn from per example (None: schedule.STEP_COUNTS, {4, 8, 16});
    # (4,) trains only the 4-step grid's transitions, what end-to-end training sees, at about a third the cost
    pairwise_steps: tuple[int, ...] | None = None
    objective: str = "ntm"  # ntm | gaussian | fm
    init_from: str | None = None  # a flow-matching checkpoint to finetune from (paper 3.6)
    align_weight: float = 2.5  # lambda of the mean-alignment loss when finetuning, cosine-decayed
    x0_mse_weight: float | None = None  # the hybrid x0-MSE term's weight (None: the preset's)
    # TarFlow blocks of f_T (None: the preset's). 0 is the identity-transporter ablation of an NTM: the
    # same predictor with its learned scale d, and f_T = identity (log-det exactly 0; issue 13)
    transporter_blocks: int | None = None
    # the transporter's capacity (None: the preset's): its patch size (1: one pixel per token, so the
    # autoregressive flow also orders the pixels within a patch), layers per block and width (issue 13)
    transporter_patch: int | None = None
    transporter_layers: int | None = None
    transporter_width: int | None = None
    # f_T of level s also reads the step's x_t (TransporterConfig.context; None: the preset's, off)
    transporter_context: bool | None = None
    x0_mse_space: str = "x"  # the hybrid term's target: "x" x0 (measured best, the default) | "u" f_T(x0, s)
    lr: float = 1e-3
    # the transporter's learning rate is lr x this (issue 13: a per-module rate for the shallow f_T)
    transporter_lr_scale: float = 1.0
    warmup: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 500
    time_budget: float | None = None  # stop after this many seconds of training (equal-budget comparisons)
    eval_images: int = 500  # held-out images scored at the end (0: skip)
    grad_accum: int = 1  # micro-batches per rank and step: global batch = batch_size x ranks x grad_accum
    parallel: str = "auto"  # under torchrun: ddp | fsdp | auto (PARALLEL)
    precision: str = "auto"  # fp32 | bf16 (autocast) | auto (PRECISIONS)
    text_encoder: str | None = None  # "minilm" | "labels" (None: the preset's, config.PRESET_TEXT_ENCODERS)

    def transporter_shape(self) -> dict[str, Any]:
        """The TransporterConfig fields this run overrides (its --transporter-* options that were given)."""
        given = {key: getattr(self, name) for key, name in _TRANSPORTER_ARGS.items()}
        return {key: value for key, value in given.items() if value is not None}

    def validate(self) -> TrainArgs:
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}; choose one of: {', '.join(OBJECTIVES)}")
        if self.init_from and self.objective == "fm":
            raise ConfigError("--init-from finetunes an NTM (or Gaussian) model from flow matching; drop --objective fm")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"unknown --parallel {self.parallel!r}; choose one of: {', '.join(PARALLEL)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown --precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.transporter_blocks is not None:
            if isinstance(self.transporter_blocks, bool) or not isinstance(self.transporter_blocks, int) \
                    or self.transporter_blocks < 0:
                raise ConfigError(f"--transporter-blocks must be a whole number >= 0, got {self.transporter_blocks!r}")
            if self.objective != "ntm" and self.transporter_blocks:
                raise ConfigError(f"--objective {self.objective} has no transporter; --transporter-blocks must be 0 "
                                  "or left out")
        for key, value in self.transporter_shape().items():
            if key == "num_blocks":
                continue
            flag = "--" + _TRANSPORTER_ARGS[key].replace("_", "-")
            if key == "context":
                if not isinstance(value, bool):
                    raise ConfigError(f"{flag} is on or off, got {value!r}")
                if not value:
                    continue
                if self.x0_mse_space == "u":
                    raise ConfigError(f"{flag} maps x_s given x_t, so the hybrid term has no u-space target: "
                                      "use --x0-mse-space x")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag} must be a whole number >= 1, got {value!r}")
            if self.objective != "ntm" or self.transporter_blocks == 0:
                raise ConfigError(f"{flag} shapes the transporter, and this run has none "
                                  f"({'--transporter-blocks 0' if self.objective == 'ntm' else '--objective ' + self.objective})")
        if self.pairwise_steps is not None:
            counts, preset = self.pairwise_steps, get_preset(self.preset)
            if not counts or any(isinstance(T, bool) or not isinstance(T, int) for T in counts) \
                    or len(set(counts)) != len(counts):
                raise ConfigError(f"--pairwise-steps must be distinct whole numbers, got {','.join(map(str, counts)) or 'none'}")
            for T in counts:  # training's t_min (up to t_min_max) stays below each grid's first level
                validate.steps(T, preset.t_min_max, preset.shift, "--pairwise-steps")
            mode = self.mode or PRESET_MODES.get(self.preset)
            if self.objective == "fm" or mode != "pairwise":
                raise ConfigError("--pairwise-steps sets pairwise training's grids; this run "
                                  + ("trains flow matching" if self.objective == "fm" else f"trains {mode}")
                                  + " (pass --mode pairwise)" * (self.objective != "fm"))
        if not (isinstance(self.align_weight, (int, float)) and math.isfinite(self.align_weight)
                and self.align_weight >= 0):
            raise ConfigError(f"--align-weight must be a number >= 0, got {self.align_weight!r}")
        if self.x0_mse_space not in X0_SPACES:
            raise ConfigError(f"unknown --x0-mse-space {self.x0_mse_space!r}; choose one of: {', '.join(X0_SPACES)}")
        if not (isinstance(self.transporter_lr_scale, (int, float)) and math.isfinite(self.transporter_lr_scale)
                and self.transporter_lr_scale > 0):
            raise ConfigError(f"--transporter-lr-scale must be a positive number, got {self.transporter_lr_scale!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "grad_accum"):
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


class Objective(torch.nn.Module):
    """The training loss as a module's forward, which DDP and FSDP wrap: (x0, ids, mask, g) -> Losses.
    The frozen teacher (finetuning) is held outside the module: it is not trained."""

    def __init__(self, model: NTM, loss_fn, teacher: NTM | None):
        super().__init__()
        self.model, self.loss_fn, self._teacher = model, loss_fn, (teacher,)

    def forward(self, x0, ids, mask, g):
        return self.loss_fn(self.model, x0, ids, mask, g, self._teacher[0])


def prompt_sampler(model: NTM, labels: torch.Tensor, class_names, dropout: float, g: torch.Generator,
                   captions=None):
    """-> draw(idx, gen=g) -> ids, mask (B, P): the training prompts of examples ``idx``, '' with probability
    ``dropout`` (classifier-free guidance). A label model reads its class token; a text model a fresh
    caption per example per step (drawn with ``gen``: ``g``, or a micro-batch's own generator, so
    --resume and DDP stay bit-exact) from the table of all
    captions, tokenised once (the encoder embeds each one once): the dataset's own ``captions`` (per
    example) when it has them, else the templates filled with the example's class name."""
    device = labels.device
    null_ids, null_mask = model.null_prompt(1)
    if model.config.prompt.kind == "label":
        ids_all = labels + 1  # label k -> prompt id k + 1

        def draw_label(idx, gen=g):
            drop = torch.rand(len(idx), generator=gen, device=device) < dropout
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

    def draw_caption(idx, gen=g):
        drop = torch.rand(len(idx), generator=gen, device=device) < dropout
        k = owner[idx]
        pick = torch.rand(len(idx), generator=gen, device=device)
        row = start[k] + (pick * count[k]).long().clamp_max(count[k] - 1)  # (B,)
        ids = torch.where(drop[:, None], null_ids.to(device), ids_t[row])  # (B, P)
        return ids, torch.where(drop[:, None], null_mask.to(device), mask_t[row])

    return draw_caption


def _ema_update(ema: list[torch.Tensor], model: NTM, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema, model.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - decay)


def param_groups(model: NTM, transporter_lr_scale: float) -> list[dict]:
    """AdamW's parameter groups: one group (every weight at the run's rate), or, when the transporter's
    rate is scaled, the transporter's weights (``lr_scale`` = the scale) and all the others (1.0).
    One group at scale 1 (or with no transporter weights: f_T = identity) keeps the optimizer state of
    earlier checkpoints loadable."""
    ours = {id(p) for p in model.transporter.parameters()}
    if transporter_lr_scale == 1.0 or not ours:
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    return [{"params": [p for p in model.parameters() if id(p) in ours], "lr_scale": float(transporter_lr_scale)},
            {"params": [p for p in model.parameters() if id(p) not in ours], "lr_scale": 1.0}]


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


def _open_out(out: Path, args: TrainArgs, resume: bool, log) -> dict | None:
    """Rank 0, before any work: check --out, finish or clean what a killed run left there, and read
    the train state to resume from (verified), or None."""
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
    if not resume:
        return None
    state = load_train_state(out)
    _check_resume(out, resumed_args(args, state), state)
    return state


def resumed_args(args: TrainArgs, state: dict) -> TrainArgs:
    """A resume's --mode and --pairwise-steps, when not given: the run's own (as for the transporter's shape
    and --x0-mse-weight). Before, a missing --pairwise-steps meant the default set, which a run trained on
    other grids refused, and a missing --mode the preset's, which switched a pairwise `tiny` run to end2end."""
    old = {**dataclasses.asdict(TrainArgs()), **state["args"]}  # older states lack newer fields
    own: dict[str, Any] = {}
    if args.mode is None:
        own["mode"] = old["mode"] or PRESET_MODES[old["preset"]]
    if args.pairwise_steps is None and old["pairwise_steps"] is not None:
        own["pairwise_steps"] = tuple(old["pairwise_steps"])
    return dataclasses.replace(args, **own)


def _check_room(out: Path, model: NTM) -> None:
    problem = output_dir_problem(out, checkpoint_bytes(model))
    if problem:
        raise NtmError(problem)


def _save(world: World, out: Path, model, ema, opt, g, step, args, history, loss_avg, saved_step,
          trained: tuple[int, ...] | None) -> int:
    """Save a checkpoint of ``step`` (rank 0 writes; every rank calls this: gathering FSDP shards is a
    collective); returns ``step``. An OSError (a full disk) is one NtmError on every rank, and the
    checkpoint of ``saved_step`` stays as it was."""
    names = [name for name, _ in model.named_parameters()]
    state = {
        "step": step, "model": full(world, model.state_dict()), "ema": dict(zip(names, full(world, ema), strict=True)),
        "optimizer": full(world, opt.state_dict()), "generator": g.get_state(), "args": dataclasses.asdict(args),
        "config": model.config.to_dict(), "history": history, "loss_avg": loss_avg, "world_size": world.size,
    }
    info = {"dataset": args.dataset, "preset": args.preset, "objective": model.config.objective,
            "trained_steps": list(trained) if trained else None}  # read by sample/eval/export (--steps outside it: warned)

    def write() -> None:
        try:
            save_training_checkpoint(out, model.config, state, info)  # the EMA weights are the ones to sample from
        except OSError as e:
            kept = f"the checkpoint of step {saved_step} is kept" if saved_step is not None else "nothing was saved"
            raise NtmError(f"cannot save step {step} to {out}: {e.strerror or e}; {kept}") from None

    from_main(world, write)
    return step


def _restore(out: Path, state: dict, model, ema, opt, g) -> None:
    """Load a train state (whole tensors) into the fresh, possibly sharded modules; a state that does
    not fit is one CheckpointError."""
    check_tensors(state["model"], _shapes(model), out / "train_state.pt")
    check_tensors(state["ema"], _shapes(model), out / "train_state.pt")
    model.load_state_dict(shard_like(state["model"], model.state_dict()))
    for e, (name, _) in zip(ema, model.named_parameters(), strict=True):
        e.copy_(shard_like(state["ema"][name], e))
    params = list(model.parameters())
    template = {"state": {i: {"exp_avg": p, "exp_avg_sq": p} for i, p in enumerate(params)}}
    try:
        opt.load_state_dict(shard_like(state["optimizer"], template))
        g.set_state(state["generator"])
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{out / 'train_state.pt'} does not fit this model ({str(e).splitlines()[0]})") from None


def _shapes(model: NTM) -> dict:
    """name -> an empty tensor of each weight's whole shape and dtype (a sharded weight's too)."""
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in model.state_dict().items()}


def _check_resume(out: Path, args: TrainArgs, state: dict) -> None:
    old = {**dataclasses.asdict(TrainArgs()), **state["args"]}  # older states lack newer fields
    shape = list(_TRANSPORTER_ARGS.values())
    weight = state["config"].get("x0_mse_weight", 0.0)  # the weight the run trains with (given or the preset's)
    if args.x0_mse_weight is not None and args.x0_mse_weight != weight:
        raise ConfigError(f"{out} was trained with --x0-mse-weight {weight!r}; resume it with the same value "
                          f"(got {args.x0_mse_weight!r})")
    finetune = ("align_weight",) if old["init_from"] else ()  # the mean alignment weighs a finetune's loss
    # the seed draws every micro-batch after a step's first (--grad-accum, ranks): another one on resume would
    # change the run's draws without a word
    for key in ("dataset", "preset", "objective", "init_from", *shape, "x0_mse_space", "transporter_lr_scale",
                "mode", "pairwise_steps", "seed", *finetune):
        if key in shape and getattr(args, key) is None:
            continue  # not given: the saved config's own
        was, now = old[key], getattr(args, key)
        if key == "mode":  # None: the preset's
            was, now = was or PRESET_MODES[old["preset"]], now or PRESET_MODES[args.preset]
            if was != now:
                raise ConfigError(f"{out} was trained with --mode {was}; resume it with the same value (got {now})")
        elif key == "pairwise_steps":  # None is the default set; a saved tuple may come back as a list
            was, now = tuple(was or STEP_COUNTS), tuple(now or STEP_COUNTS)
            shown = lambda v: ",".join(map(str, v))  # noqa: E731
            if was != now:
                raise ConfigError(f"{out} was trained with --pairwise-steps {shown(was)}; resume it with the same "
                                  f"value (got {shown(now)})")
        elif key == "transporter_context":  # a flag: given means on
            if not was:
                raise ConfigError(f"{out} was trained without --transporter-context; resume it without it")
        elif was != now:
            raise ConfigError(f"{out} was trained with --{key.replace('_', '-')} {was!r}; "
                              f"resume it with the same value (got {now!r})")


def _check_text_encoder(args: TrainArgs, config: NTMConfig, resumed: bool) -> None:
    """A resumed run and a finetune keep the prompt encoder their checkpoint was trained with: a
    --text-encoder that names another one is refused (it used to be ignored without a word)."""
    if args.text_encoder is None or TEXT_ENCODERS[args.text_encoder] == config.prompt.kind:
        return
    held = next(flag for flag, kind in TEXT_ENCODERS.items() if kind == config.prompt.kind)
    source, origin = ("resumed run", args.out) if resumed else ("flow-matching model", args.init_from)
    raise ConfigError(f"the {source} {origin} encodes prompts with --text-encoder {held}, which it keeps; "
                      f"drop --text-encoder {args.text_encoder} or pass {held}")


def _micro_batch(objective, images, draw_prompts, g, args: TrainArgs, config: NTMConfig, autocast, step: int,
                 k: int) -> torch.Tensor:
    """Global micro-batch ``k`` of ``step``: its draws (all from the micro-batch's own generator: the
    examples, the dequantisation noise, the prompts of prompt_sampler), forward and loss -> (loss,
    main term, x0 MSE)."""
    gk = micro_generator(g, args.seed, step, k, images.device)
    idx = torch.randint(len(images), (args.batch_size,), generator=gk, device=images.device)
    x0 = dequantize(images[idx], gk)  # (B, C, H, W)
    ids, mask = draw_prompts(idx, gk)  # (B, P): '' with probability prompt_dropout
    with autocast():
        losses = objective(x0, ids, mask, gk)
        loss = losses.total(config.x0_mse_weight, _align_weight_at(args, step))
    return torch.stack([loss, losses.main.detach(), losses.x0_mse.detach()])


def train(args: TrainArgs, resume: bool = False, progress: bool = True, log=print, log_every: int = 100) -> dict:
    """Run (or continue) a training run; returns a summary (final loss, held-out likelihood).

    With ``progress`` a rich progress bar shows the loss; without it (no terminal: CI, nohup) a
    plain line is logged every ``log_every`` steps. Under torchrun only rank 0 logs and saves.
    SIGINT and SIGTERM are caught from the start, on every rank: one that arrives while the run
    loads (or completes a killed run's save) stops it like one during training, with a checkpoint
    and exit status 130 / 143 (under torchrun after the step that every rank agrees on).
    """
    stop = StopSignals()
    with stop:
        world = join(args.device)
        with reporting(world):
            args = args.validate()
            quiet = not world.main
            return _train(args, world, resume, progress and not quiet, (lambda *_: None) if quiet else log, log_every,
                          stop)


def _train(args: TrainArgs, world: World, resume: bool, progress: bool, log, log_every: int, stop: StopSignals) -> dict:
    out = Path(args.out)
    state = from_main(world, lambda: _open_out(out, args, resume, log))
    if state is not None:
        args = resumed_args(args, state)
    preset = get_preset(args.preset)
    if state is not None:
        config = NTMConfig.from_dict(state["config"])
    elif args.init_from:
        config = finetune_config(load_config(args.init_from), preset, args.objective)
    else:
        config = None
    if config is not None:  # before the data loads: a resumed run's or a finetune's prompt encoder is its checkpoint's
        _check_text_encoder(args, config, resumed=state is not None)
    image_size = config.image_size if config else preset.image_size
    data = load_dataset(args.dataset, "train", image_size=image_size, seed=0)
    if config is None:
        kind = TEXT_ENCODERS[args.text_encoder] if args.text_encoder else PRESET_TEXT_ENCODERS[args.preset]
        config = preset.with_data(data.channels, data.class_names).with_text_encoder(kind).for_objective(args.objective)
    if state is None and args.x0_mse_weight is not None:  # a fresh run or a finetune; a resumed run keeps its own
        config = dataclasses.replace(config, x0_mse_weight=args.x0_mse_weight).validate()
    if state is None and args.transporter_shape():
        transporter = dataclasses.replace(config.transporter, **args.transporter_shape())
        config = dataclasses.replace(config, transporter=transporter).validate()
    if config.prompt.class_names != data.class_names:
        raise ConfigError(f"{args.dataset} has classes {data.class_names}, the model {config.prompt.class_names}")
    mode = args.mode or PRESET_MODES[args.preset]

    torch.manual_seed(args.seed)
    device = torch.device(world.device)
    model = NTM(config).to(device).train()
    teacher = _init_from_fm(model, args.init_from) if args.init_from else None
    if args.align_weight == 0:  # no mean alignment: the frozen teacher's forward pass would be wasted work
        teacher = None
    shard = args.parallel == "fsdp" or (args.parallel == "auto" and args.preset in SHARDED_PRESETS)
    step_counts = args.pairwise_steps or STEP_COUNTS
    shown_counts = f", T in {{{', '.join(map(str, step_counts))}}}" if mode == "pairwise" else ""
    loss_fn = loss_function(config.objective, mode, args.x0_mse_space, step_counts)
    objective = wrap(world, Objective(model, loss_fn, teacher), shard)
    ema = [p.detach().clone() for p in model.parameters()]  # EMA weights (sharded as the model is)
    opt = torch.optim.AdamW(param_groups(model, args.transporter_lr_scale), lr=args.lr, betas=(0.9, 0.99),
                            weight_decay=args.weight_decay)
    g = torch.Generator(device=device).manual_seed(args.seed)
    step, history, loss_avg, saved_step = 0, [], None, None
    if state is not None:
        _restore(out, state, model, ema, opt, g)
        step, history, loss_avg = state["step"], state["history"], state.get("loss_avg")
        saved_step = step
        log(f"resuming {out} at step {step}")
    if step >= args.steps:
        raise ConfigError(f"{out} is already at step {step}; pass a larger --steps to continue it")
    from_main(world, lambda: _check_room(out, model))

    images = torch.from_numpy(data.images).to(device)  # (N, H, W, C) uint8
    draw_prompts = prompt_sampler(model, torch.from_numpy(data.labels).to(device), data.class_names,
                                  config.prompt_dropout, g, data.captions)
    unit = "mse" if config.objective == "fm" else "nats/dim"
    n_params = sum(p.numel() for p in model.parameters())
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    micro = world.size * args.grad_accum
    log(f"training {args.preset} {config.objective} ({n_params / 1e6:.2f}M params, "
        f"{'velocity MSE' if config.objective == 'fm' else mode + shown_counts}) on {args.dataset} ({len(data)} images) "
        f"for steps {step}..{args.steps}" + (f", finetuning from {args.init_from}" if args.init_from else "")
        + (f"; global batch {micro * args.batch_size} = {args.batch_size} x {world.size} ranks "
           f"({'FSDP2' if shard else 'DDP'}) x {args.grad_accum} accumulation" if world.distributed else
           f"; global batch {micro * args.batch_size} = {args.batch_size} x {args.grad_accum} accumulation"
           if micro > 1 else "")
        + ("; bf16 autocast" if bf16 else ""))

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeRemainingColumn(), disable=not progress)
    start = time.time()
    trained = trained_step_counts(config.objective, mode, args.pairwise_steps, config.steps)
    save = functools.partial(_save, world, out, model, ema, opt, g, args=args, history=history, trained=trained)
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext
    signalled, budget_hit = False, False
    try:
        with bar:
            task = bar.add_task("train", total=args.steps, completed=step, info="")
            while step < args.steps and not (signalled or budget_hit):
                budget = args.time_budget is not None and time.time() - start >= args.time_budget
                if not world.distributed and (stop.requested or budget):  # one process stops before a step
                    signalled, budget_hit = stop.requested, budget
                    break
                opt.zero_grad(set_to_none=True)

                micro_batch = functools.partial(_micro_batch, objective, images, draw_prompts, g, args, config, autocast,
                                                step)
                # every rank's micro-batches, then agreement on the loss and on stopping after this step
                (total, main, x0_mse), agreed = accumulate(world, objective, args.grad_accum, micro_batch,
                                                           (stop.requested, budget))
                if not math.isfinite(total):
                    kept = f"the checkpoint of step {saved_step} is kept" if saved_step is not None else "nothing saved"
                    raise NtmError(f"the loss became {total} at step {step}; lower --lr ({kept})")
                for group in opt.param_groups:
                    group["lr"] = _lr_at(args, step) * group.get("lr_scale", 1.0)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                opt.step()
                _ema_update(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
                step += 1
                loss_avg = main if loss_avg is None else 0.98 * loss_avg + 0.02 * main
                if step % 50 == 0 or step == args.steps:
                    history.append({"step": step, "loss": loss_avg, "x0_mse": x0_mse, "seconds": time.time() - start})
                bar.update(task, completed=step, info=f"loss {loss_avg:.4f} {unit}")
                if not progress and (step % log_every == 0 or step == args.steps):
                    log(f"step {step}/{args.steps}  loss {loss_avg:.4f} {unit}  {time.time() - start:.0f} s")
                if world.distributed:
                    signalled, budget_hit = agreed
                if step % args.checkpoint_every == 0 and step < args.steps and not (signalled or budget_hit):
                    with stop.hold():
                        saved_step = save(step, loss_avg=loss_avg, saved_step=saved_step)
            if budget_hit and not signalled:
                log(f"time budget of {args.time_budget:.0f} s reached at step {step}")
            with stop.hold():
                if saved_step != step:
                    saved_step = save(step, loss_avg=loss_avg, saved_step=saved_step)
    except Interrupted as e:  # a second signal, mid-step: nothing of this step is saved
        log(f"stopped by a second {signal_name(e.signum)} at step {step} without saving"
            + (f"; {out} keeps step {saved_step}" if saved_step is not None else ""))
        raise
    if signalled or (stop.requested and not world.distributed):
        signum = stop.signum or signal.SIGTERM  # a rank that was not signalled itself stops as if asked to
        log(f"interrupted by {signal_name(signum)} at step {step}; checkpoint saved to {out}; "
            "continue with --resume")
        raise Interrupted(signum, saved=True)
    summary: dict = {"step": step, "mode": mode, "objective": config.objective, "train_loss": loss_avg,
                     "seconds": time.time() - start, "params": n_params}
    if args.eval_images > 0:
        ema_full = dict(zip([n for n, _ in model.named_parameters()], full(world, ema), strict=True))
    if args.eval_images > 0 and world.main:
        ema_model = NTM(config).to(device).eval()
        ema_model.load_state_dict(ema_full)
        test = load_dataset(args.dataset, "test", image_size=image_size, seed=0)
        n = min(args.eval_images, len(test))
        scored_T = scoring_step_count(trained, config.steps)
        summary["heldout"] = heldout_likelihood(ema_model, test.images[:n], test.labels[:n], steps=scored_T)
        log(f"held-out ({n} images, T = {scored_T}): "
            f"{summary['heldout']['bits_per_dim']:.3f} bits/dim (bound), "
            f"trajectory NLL {summary['heldout']['trajectory_nats_per_dim']:.4f} nats/dim")
    log(f"saved {out} at step {step} ({summary['seconds']:.0f} s)")
    return summary
