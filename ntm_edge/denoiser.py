"""The learned denoiser g_phi (paper 3.9): u_t0 and the prompt -> x0 in one non-causal pass.

It leaves u-space without the autoregressive transporter inversion. Trained after the NTM, with
the NTM frozen, by MSE to the score-denoised targets (exits.score_denoise) that the NTM computes on
forward trajectories of the training images: no data beyond the training set.

Stored next to the NTM in its checkpoint directory: denoiser.safetensors and denoiser.json (config,
sha256 of the weights and of the NTM weights it was trained for, sealed by the sha256 of its own
fields), written as one atomic save; the NTM's own files are never touched. On load the config is
validated, the weights must match their hash and the config's shapes, and the NTM must still be
the one the denoiser was trained for. SIGINT / SIGTERM while training stop it with nothing saved
(exit 130 / 143): there is no partial denoiser.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .assets import resolve_checkpoint
from .checkpoint import check_tensors, load_info, read_json, trained_on, verify_file
from .config import PROMPT_KINDS, PredictorConfig
from .distributed import World, accumulate, from_main, join, micro_generator, reporting, wrap
from .errors import CheckpointError, ConfigError, NtmError
from .fileio import (
    StagedWrites,
    finish_interrupted_save,
    is_sealed,
    output_dir_problem,
    remove_stale_temporaries,
    seal,
    sha256_file,
)
from .interrupts import Interrupted, StopSignals, signal_name
from .model import NTM, LabelEncoder
from .numerics import dequantize
from .predictor import TransformerBackbone

WEIGHTS, META = "denoiser.safetensors", "denoiser.json"
HASHED = {WEIGHTS: "weights_sha256"}  # in denoiser.json
FORMAT_VERSION = 1


@dataclass(frozen=True)
class DenoiserConfig:
    image_size: int
    channels: int
    num_prompt_tokens: int
    t0: float  # the level u_t0 it reads (the sampler's t_min)
    steps: int  # the sampler's T it was trained for
    prompt_dim: int = 64
    prompt_kind: str = "label"  # the NTM's prompt encoder: "label" (its own copy of the table) | "minilm"
    max_tokens: int = 16  # minilm: the prompt length P
    patch_size: int = 2
    width: int = 128
    depth: int = 4
    heads: int = 4

    def validate(self) -> DenoiserConfig:
        for name in ("image_size", "channels", "num_prompt_tokens", "steps", "prompt_dim", "patch_size", "width",
                     "depth", "heads"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"denoiser {name} must be an integer >= 1, got {value!r}")
        if type(self.t0) not in (int, float) or not 0.0 < self.t0 < 1.0:
            raise ConfigError(f"denoiser t0 must lie in (0, 1), got {self.t0!r}")
        if self.prompt_kind not in PROMPT_KINDS:
            raise ConfigError(f"denoiser prompt_kind must be one of {', '.join(PROMPT_KINDS)}, got {self.prompt_kind!r}")
        if self.image_size % self.patch_size or self.width % self.heads:
            raise ConfigError("denoiser: the image size must be divisible by the patch, the width by the heads")
        return self


class Denoiser(nn.Module):
    """g_phi: a non-causal transformer over the patch tokens of u_t0, prompt as prefix tokens.

    Its prompt tokens are the NTM's: a label model's learned table (copied, then trained on), or a
    text model's frozen MiniLM, the very instance the NTM reads (text_prompts.shared_minilm), so
    the denoiser's checkpoint holds no second encoder."""

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.config = cfg
        self.prompt_encoder: nn.Module
        if cfg.prompt_kind == "label":
            self.prompt_encoder = LabelEncoder(cfg.num_prompt_tokens, cfg.prompt_dim)
        else:
            from .text_prompts import TextPromptEncoder

            self.prompt_encoder = TextPromptEncoder(cfg.max_tokens)
        backbone = PredictorConfig(backbone="transformer", grid_conditioning=False, patch_size=cfg.patch_size,
                                   width=cfg.width, depth=cfg.depth, heads=cfg.heads)
        self.net = TransformerBackbone(backbone, cfg.channels, cfg.image_size, cfg.prompt_dim)

    def forward(self, u_t0: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """u_t0 (B, C, H, W), ids/mask (B, P) -> x0 (B, C, H, W)."""
        return self.denoise(u_t0, self.prompt_encoder(ids), mask)

    def denoise(self, u_t0: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """u_t0 (B, C, H, W), prompt tokens emb (B, P, E), mask (B, P) -> x0 (B, C, H, W): the network
        behind ``forward``, given the prompt tokens (a text model's exported graph takes them from the
        prompt-encoder graph, so the MiniLM is not traced a second time)."""
        t = torch.full((u_t0.shape[0],), self.config.t0, device=u_t0.device)
        return self.net(u_t0, (t,), emb, mask)[0]


def denoiser_config(model: NTM) -> DenoiserConfig:
    """The default denoiser of ``model``: its image shape, sampler level t0 and T, and its prompt encoder."""
    cfg = model.config
    return DenoiserConfig(image_size=cfg.image_size, channels=cfg.channels,
                          num_prompt_tokens=len(cfg.prompt.class_names) + 1, t0=cfg.t_min_sample, steps=cfg.steps,
                          prompt_dim=cfg.prompt.dim, prompt_kind=cfg.prompt.kind, max_tokens=cfg.prompt.max_tokens)


def has_denoiser(checkpoint) -> bool:
    return (Path(resolve_checkpoint(checkpoint)) / META).exists()


def save_denoiser(den: Denoiser, checkpoint, info: dict) -> None:
    """denoiser.safetensors and its sealed denoiser.json, tied to the NTM weights in ``checkpoint``."""
    from safetensors.torch import save

    path = Path(checkpoint)
    weights = save({k: v.detach().cpu().contiguous() for k, v in den.state_dict().items()})
    meta = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(den.config),
            "ntm_weights_sha256": load_info(path).get("weights_sha256"), **info}
    with StagedWrites() as staged:
        meta["weights_sha256"] = sha256_file(staged.write(path / WEIGHTS, lambda tmp: Path(tmp).write_bytes(weights)))
        staged.write(path / META, lambda tmp: Path(tmp).write_text(json.dumps(seal(meta), indent=2)))


def _finish_interrupted(path: Path) -> None:
    try:
        finish_interrupted_save(path, META, HASHED)  # a save whose writer was killed while renaming
    except OSError:
        pass


def load_denoiser(checkpoint, device: str = "cpu") -> Denoiser:
    """The denoiser saved in ``checkpoint`` ("default": the shipped model's), verified and tied to its NTM weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(resolve_checkpoint(checkpoint))
    _finish_interrupted(path)
    retrain = "; retrain it with `ntm-edge train-denoiser`"
    try:
        meta = read_json(path / META, "denoiser")
    except CheckpointError as e:
        raise CheckpointError(f"{e}{retrain}") from None
    if meta.get("format_version") != FORMAT_VERSION or not is_sealed(meta):
        raise CheckpointError(f"{path / META} does not match its recorded sha256 (corrupt, edited, or written by "
                              f"an older ntm-edge){retrain}")
    if meta.get("ntm_weights_sha256") != load_info(path).get("weights_sha256"):
        raise CheckpointError(f"the denoiser in {path} was trained for other NTM weights (the NTM was trained "
                              f"further since){retrain}")
    weights = path / WEIGHTS
    verify_file(weights, meta.get("weights_sha256"), retrain)
    try:
        den = Denoiser(DenoiserConfig(**meta["config"]).validate())
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path / META} does not describe a denoiser ({e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{path / META}: {e}") from None
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} cannot be read ({e})") from None
    check_tensors(tensors, den.state_dict(), weights)
    den.load_state_dict(tensors)
    return den.to(device).eval()


def build_targets(model: NTM, images, labels, t0: float, trajectories: int, g: torch.Generator,
                  batch_size: int = 128, clip_percentile: float | None = 99.0, progress=None):
    """Score-denoised targets on forward trajectories of real images -> u_t0, x_den (M, C, H, W), ids (M, P):
    each target is denoised under its class name as the prompt (M = trajectories x images, in order)."""
    from .exits import score_denoise

    T = model.config.steps
    us, targets, all_ids = [], [], []
    for _ in range(trajectories):
        for i in range(0, len(images), batch_size):
            x0 = dequantize(images[i : i + batch_size], g)
            ids, mask = model.tokenize(torch.from_numpy(model.vocab.ids_for_labels(labels[i : i + batch_size].cpu())))
            traj = model.forward_trajectory(x0, T, generator=g, t_min=t0)
            targets.append(score_denoise(model, traj, ids, mask, clip_percentile).detach())
            with torch.no_grad():
                us.append(model.transporter(traj.x[:, 0], traj.t[:, 0], T)[0])
            all_ids.append(ids)
            if progress:
                progress(len(x0))
    return torch.cat(us), torch.cat(targets), torch.cat(all_ids)


def _open_checkpoint(checkpoint, log) -> tuple[dict, dict, str]:
    """Rank 0, before any work: the NTM (verified) as (config, weights) and its dataset; what a killed
    run left in the directory is finished or removed, and the room for a denoiser checked."""
    model = NTM.from_pretrained(checkpoint)
    cfg = model.config
    if cfg.objective == "fm":
        raise ConfigError("a flow-matching checkpoint has no u-space to denoise; train the denoiser for an NTM")
    if model.contextual:
        raise ConfigError("a contextual transporter's sampler ends in x-space: it has no denoiser; "
                          "sample it with --final inverse or inverse+score")
    dataset = trained_on(checkpoint)
    if dataset is None:
        raise ConfigError(f"{checkpoint} does not record its dataset")
    _finish_interrupted(Path(checkpoint))
    removed = remove_stale_temporaries(checkpoint)
    if removed:
        log(f"removed {len(removed)} temporary file(s) that a killed run left in {checkpoint}")
    den = Denoiser(denoiser_config(model))
    problem = output_dir_problem(Path(checkpoint), 2 * sum(t.numel() * t.element_size() for t in den.state_dict().values()))
    if problem:
        raise NtmError(problem)
    return cfg.to_dict(), model.state_dict(), dataset


def train_denoiser(checkpoint, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3, trajectories: int = 2,
                   seed: int = 0, device: str = "cpu", progress: bool = True, log=print, grad_accum: int = 1,
                   precision: str = "auto") -> dict:
    """Train g_phi for the NTM in ``checkpoint`` and save it there; returns a summary.

    Under torchrun (distributed.py) the steps are data parallel (DDP; global batch = batch_size x
    ranks x grad_accum) and rank 0 alone reads the checkpoint, logs and saves; every rank builds the
    same targets (same seed), so that part does not get faster with more ranks.
    """
    world = join(device)
    with reporting(world):
        quiet = not world.main
        return _train_denoiser(world, Path(checkpoint), steps, batch_size, lr, trajectories, seed, grad_accum, precision,
                               progress and not quiet, (lambda *_: None) if quiet else log)


def _train_denoiser(world: World, checkpoint: Path, steps: int, batch_size: int, lr: float, trajectories: int, seed: int,
                    grad_accum: int, precision: str, progress: bool, log) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .config import NTMConfig
    from .data import load_dataset
    from .train import prompt_sampler

    if steps < 1 or trajectories < 1 or grad_accum < 1 or batch_size < 1:
        raise ConfigError("--steps, --trajectories, --batch-size and --grad-accum must be at least 1")
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"unknown --precision {precision!r}; choose one of: auto, fp32, bf16")
    if world.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device")
    config, weights, dataset = from_main(world, lambda: _open_checkpoint(checkpoint, log))
    device = torch.device(world.device)
    model = NTM(NTMConfig.from_dict(config))
    model.load_state_dict(weights)
    model = model.to(device).eval().requires_grad_(False)
    cfg = model.config
    data = load_dataset(dataset, "train", image_size=cfg.image_size, channels=cfg.channels)
    g = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)
    images = torch.from_numpy(data.images).to(device)
    labels = torch.from_numpy(data.labels).to(device)
    dcfg = denoiser_config(model)
    den = Denoiser(dcfg).to(device)
    if dcfg.prompt_kind != "label":  # the NTM's encoder, and its cache, which prompt_sampler fills in fixed chunks
        den.prompt_encoder = copy.deepcopy(model.prompt_encoder)
    den.prompt_encoder.load_state_dict(model.prompt_encoder.state_dict())
    net = wrap(world, den, shard=False)
    opt = torch.optim.AdamW(den.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext
    start = time.time()
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not progress)
    stop = StopSignals()

    def check_stop() -> None:  # between two batches: nothing is half done, and nothing is saved
        if stop.requested:
            raise Interrupted(stop.received, saved=False)

    def micro_batch(step: int, k: int) -> torch.Tensor:  # -> (mse,)
        gk = micro_generator(g, seed, step, k, device)
        idx = torch.randint(len(u0), (batch_size,), generator=gk, device=device)
        b_ids, b_mask = draw_prompts(idx, gk)  # (B, P): '' with probability prompt_dropout
        with autocast():
            out = net(u0[idx], b_ids, b_mask)
        return (out.float() - x_den[idx]).pow(2).mean()[None]

    try:
        with stop, bar:
            log(f"building {trajectories * len(images)} score-denoised targets ({trajectories} per training image)")
            task = bar.add_task("targets", total=trajectories * len(images), info="")
            def built(n: int) -> None:
                bar.advance(task, n)
                check_stop()

            u0, x_den, _ = build_targets(model, images, labels, dcfg.t0, trajectories, g, progress=built)
            captions = data.captions * trajectories if data.captions is not None else None  # targets' order
            draw_prompts = prompt_sampler(model, labels.repeat(trajectories), data.class_names, cfg.prompt_dropout, g,
                                          captions)
            log(f"built {len(u0)} score-denoised targets in {time.time() - start:.0f} s")
            task = bar.add_task("denoiser", total=steps, info="")
            loss_avg = None
            for step in range(steps):
                if not world.distributed:
                    check_stop()
                opt.zero_grad(set_to_none=True)
                (mse,), (signalled,) = accumulate(world, net, grad_accum, functools.partial(micro_batch, step),
                                                  (stop.requested,))
                if signalled:  # every rank agrees, after the same step
                    raise Interrupted(stop.signum or signal.SIGTERM, saved=False)
                for group in opt.param_groups:  # warm-up, then cosine decay
                    group["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
                torch.nn.utils.clip_grad_norm_(den.parameters(), 1.0)
                opt.step()
                loss_avg = mse if loss_avg is None else 0.98 * loss_avg + 0.02 * mse
                bar.update(task, completed=step + 1, info=f"mse {loss_avg:.5f}")
                if not progress and ((step + 1) % 200 == 0 or step + 1 == steps):
                    log(f"denoiser step {step + 1}/{steps}  mse {loss_avg:.5f}  {time.time() - start:.0f} s")
    except Interrupted as e:
        log(f"interrupted by {signal_name(e.signum)}: the denoiser was not saved (it has no partial checkpoint); "
            f"{checkpoint} is unchanged")
        raise
    summary = {"steps": steps, "train_mse": loss_avg, "targets": len(u0), "seconds": time.time() - start}

    def write() -> None:
        try:
            save_denoiser(den.eval(), checkpoint, {"trained": summary, "dataset": dataset})
        except OSError as e:
            raise NtmError(f"cannot save the denoiser into {checkpoint}: {e.strerror or e}; "
                           "the checkpoint is unchanged") from None

    from_main(world, write)
    log(f"saved the denoiser into {checkpoint} ({summary['seconds']:.0f} s)")
    return summary
