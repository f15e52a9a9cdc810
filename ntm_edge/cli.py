"""The `ntm-edge` command line. Commands parse their options and delegate to one library function;
errors a user can cause print one line and exit with status 1. Torch is imported inside commands."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import validate
from .decoding import DEFAULT_METHOD
from .errors import NtmError, one_line

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Normalizing Trajectory Models: few-step generation with an exact likelihood.")


def _log(message: str) -> None:
    print(message, flush=True)  # flushed: a run under nohup or CI is followed through its log file


def _warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


_THREADS = ("CPU threads per graph, at most the cores this process may use; 0: onnxruntime's choice (one per "
            "physical core), -1: every core; default: $OMP_NUM_THREADS, else onnxruntime's choice")
_DEVICE = "cpu | cuda | cuda:N"
_STEPS = "coarse steps T (at most 39 at the default t_min 0.025: t_1 = 1/T must stay above t_0)"
_GRID = ("image grid to write, in the format its suffix names: .png, .jpg, .jpeg, .webp, .bmp "
         "(at most 16.8 megapixels: the first images of a larger --num)")
_ARRAY = "also write every image as uint8 (N, H, W, C) to this .npy"
_DEFAULT_EXIT = "the denoiser if there is one and it was trained for --steps, else inverse"


_CHECKPOINT = "checkpoint directory, or `default` for the shipped model"


def _checkpoint(path: Path, *, writes_into: bool = False) -> Path:
    """A --checkpoint: the directory given, or the shipped model's verified checkpoint for the word
    "default" (a directory of that name, when there is one, is what the user means: it wins)."""
    from .assets import DEFAULT, checkpoint_dir

    if str(path) != DEFAULT or path.exists():
        return path
    if writes_into:
        raise NtmError("--checkpoint default: the shipped model is read-only (it already has its denoiser); "
                       "train into a checkpoint of your own")
    return checkpoint_dir()


def _friendly(fn):
    """Run a command; an NtmError becomes 'error: ...' on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NtmError as e:  # one line, even where the message quotes a path with a newline in it
            if not e.quiet:  # quiet: a torchrun rank other than 0, whose rank 0 reports it
                typer.echo(one_line(e), err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:  # 130 for Ctrl-C; a run stopped by SIGTERM says 143 (interrupts.py)
            raise typer.Exit(getattr(e, "exit_code", 130)) from None

    return wrapper


@app.command()
@_friendly
def train(
    dataset: Annotated[str, typer.Option(help="digits | mnist5k | folder:PATH | npz:PATH")] = "digits",
    preset: Annotated[str, typer.Option(help="model size: tiny | small | base")] = "tiny",
    steps: Annotated[int, typer.Option(help="total optimizer steps (with --resume: the new total)")] = 1000,
    batch_size: Annotated[int, typer.Option(help="examples per step")] = 64,
    out: Annotated[Path, typer.Option(help="checkpoint directory to write")] = Path("runs/ntm"),
    mode: Annotated[str, typer.Option(help="end2end | pairwise (default: the preset's)")] = "",
    pairwise_steps: Annotated[str, typer.Option(help="pairwise mode: the step counts T is drawn from, comma-separated "
                                                "(default 4,8,16; 4: only the 4-step grid, as end2end trains)")] = "",
    objective: Annotated[str, typer.Option(help="ntm | gaussian (f_T = id, sigma = C) | fm (flow matching)")] = "ntm",
    init_from: Annotated[Path | None, typer.Option(help="finetune from this flow-matching checkpoint")] = None,
    align_weight: Annotated[float, typer.Option(help="mean-alignment lambda when finetuning (cosine-decayed)")] = 2.5,
    time_budget: Annotated[float | None, typer.Option(help="stop after this many seconds of training")] = None,
    x0_mse_weight: Annotated[float | None, typer.Option(help="weight of the hybrid x0-MSE term (default: the preset's)")] = None,
    transporter_blocks: Annotated[int | None, typer.Option(help="TarFlow blocks of f_T (default: the preset's); "
                                                         "0: the identity-transporter ablation")] = None,
    transporter_patch: Annotated[int | None, typer.Option(help="f_T's patch size (default: the preset's); 1: a "
                                                        "token per pixel, the most expressive ordering")] = None,
    transporter_layers: Annotated[int | None, typer.Option(help="layers per TarFlow block (default: the preset's)")] = None,
    transporter_width: Annotated[int | None, typer.Option(help="f_T's width (default: the preset's)")] = None,
    transporter_context: Annotated[bool, typer.Option(help="f_T of each level also reads the step's noisier level "
                                                      "x_t (exact likelihood; the sampler inverts f_T at every "
                                                      "step; no export yet)")] = False,
    x0_mse_space: Annotated[str, typer.Option(help="target of the hybrid term: x (x0; pulls f_T toward the "
                                                   "identity, the better samples) | u (f_T(x0), the space of "
                                                   "the predictor's x0-hat; f_T learns mostly to shrink)")] = "x",
    lr: Annotated[float, typer.Option(help="peak AdamW learning rate")] = 1e-3,
    transporter_lr_scale: Annotated[float, typer.Option(help="the transporter's learning rate is --lr x this")] = 1.0,
    resume: Annotated[bool, typer.Option(help="continue the run saved in --out")] = False,
    device: Annotated[str, typer.Option(help=_DEVICE)] = "cpu",
    seed: Annotated[int, typer.Option(help="seed of all training randomness")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = 500,
    eval_images: Annotated[int, typer.Option(help="held-out images scored at the end (0: none)")] = 500,
    grad_accum: Annotated[int, typer.Option(help="micro-batches per rank and step (global batch = batch-size x ranks x it)")] = 1,
    parallel: Annotated[str, typer.Option(help="under torchrun: ddp | fsdp | auto (fsdp for base)")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32 | bf16 (autocast) | auto (bf16 on CUDA)")] = "auto",
    text_encoder: Annotated[str, typer.Option(help="minilm (free-form text) | labels (class names); "
                                              "default: minilm for small and base, labels for tiny")] = "",
):
    """Train an NTM by its exact trajectory likelihood (or a baseline on the same backbone). Runs
    unchanged under `torchrun --nproc-per-node N` (data parallel; rank 0 logs and saves)."""
    validate.learning_rate(lr)
    validate.seed(seed)
    validate.count(grad_accum, "--grad-accum")
    device = validate.torch_device(device)
    from .train import TrainArgs
    from .train import train as run

    args = TrainArgs(dataset=dataset, preset=preset, steps=steps, batch_size=batch_size, out=str(out),
                     mode=mode or None, pairwise_steps=validate.whole_numbers(pairwise_steps, "--pairwise-steps"),
                     objective=objective, init_from=str(init_from) if init_from else None,
                     align_weight=align_weight, time_budget=time_budget, x0_mse_weight=x0_mse_weight,
                     transporter_blocks=transporter_blocks, transporter_patch=transporter_patch,
                     transporter_layers=transporter_layers, transporter_width=transporter_width,
                     transporter_context=transporter_context or None, x0_mse_space=x0_mse_space, lr=lr,
                     transporter_lr_scale=transporter_lr_scale,
                     device=device, seed=seed, checkpoint_every=checkpoint_every,
                     eval_images=eval_images, grad_accum=grad_accum, parallel=parallel, precision=precision,
                     text_encoder=text_encoder or None)
    run(args, resume=resume, progress=sys.stderr.isatty(), log=_log)


# Options of both `sample` (torch) and `run` (the runtime): one definition, one help text each.
Prompt = Annotated[str, typer.Option(help="class name ('3', 'three'), or free text for a text model "
                                          "('a handwritten seven'); '' for unconditional")]
NumImages = Annotated[int, typer.Option(help="number of images")]
Steps = Annotated[int, typer.Option(help=_STEPS)]
Seed = Annotated[int, typer.Option(help="noise seed (the same seed draws the same images in `sample` and `run`)")]
Guidance = Annotated[float, typer.Option(help="classifier-free guidance weight w (0: off)")]
Temperature = Annotated[float, typer.Option(help="noise temperature tau: every draw of the sampler scaled by it "
                                                 "(1: Algorithm 2; below 1 trades diversity for fidelity, like "
                                                 "guidance, at one predictor pass per step instead of two)")]
OutGrid = Annotated[Path, typer.Option(help=_GRID)]
SaveArray = Annotated[Path | None, typer.Option(help=_ARRAY)]
InverseMethod = Annotated[str, typer.Option(help=(
    "transporter inversion, both exact: jacobi (parallel fixed-point passes) | sequential (token by token). "
    "Default jacobi: the faster one at batch 1 (5-11x on `small`, CPU; README, 'Does the transporter move?'), "
    "about as fast at batch 64"))]


@app.command()
@_friendly
def sample(
    checkpoint: Annotated[Path, typer.Option(help=_CHECKPOINT)],
    prompt: Prompt,
    num: NumImages = 16,
    steps: Steps = 4,
    seed: Seed = 0,
    guidance: Guidance = 0.0,
    temperature: Temperature = 1.0,
    out: OutGrid = Path("samples.png"),
    save_array: SaveArray = None,
    final: Annotated[str, typer.Option(help="inverse | inverse+score | denoiser (default: " + _DEFAULT_EXIT + ")")] = "",
    inverse_method: InverseMethod = DEFAULT_METHOD,
    device: Annotated[str, typer.Option(help=_DEVICE + " (cuda: CUDA graphs + bf16 autocast for the denoiser and "
                                                     "Jacobi exits; untested: no GPU has run it yet)")] = "cpu",
):
    """Generate images with the four-step sampler (Algorithm 2) and an exit from u-space."""
    from .generate import generate

    generate(_checkpoint(checkpoint), prompt, num=num, steps=steps, seed=seed, guidance=guidance, out=out,
             save_array_to=save_array, final=final or None, inverse_method=inverse_method, device=device, log=_log,
             warn=_warn, temperature=temperature)


@app.command("train-denoiser")
@_friendly
def train_denoiser(
    checkpoint: Annotated[Path, typer.Option(help="NTM checkpoint directory (the denoiser is saved into it)")],
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 2000,
    batch_size: Annotated[int, typer.Option(help="examples per step")] = 64,
    lr: Annotated[float, typer.Option(help="peak AdamW learning rate")] = 1e-3,
    trajectories: Annotated[int, typer.Option(help="score-denoised targets per training image")] = 2,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    device: Annotated[str, typer.Option(help=_DEVICE)] = "cpu",
    grad_accum: Annotated[int, typer.Option(help="micro-batches per rank and step (global batch = batch-size x ranks x it)")] = 1,
    precision: Annotated[str, typer.Option(help="fp32 | bf16 (autocast) | auto (bf16 on CUDA)")] = "auto",
):
    """Train the one-pass denoiser g_phi on score-denoised targets of the frozen NTM (paper 3.9).
    Runs unchanged under `torchrun --nproc-per-node N`."""
    validate.count(steps, "--steps")
    validate.count(batch_size, "--batch-size")
    validate.count(trajectories, "--trajectories")
    validate.count(grad_accum, "--grad-accum")
    validate.learning_rate(lr)
    validate.seed(seed)
    device = validate.torch_device(device)
    from .denoiser import train_denoiser as run

    checkpoint = _checkpoint(checkpoint, writes_into=True)
    run(checkpoint, steps=steps, batch_size=batch_size, lr=lr, trajectories=trajectories, seed=seed,
        device=device, progress=sys.stderr.isatty(), log=_log, grad_accum=grad_accum, precision=precision)


@app.command("eval")
@_friendly
def evaluate(
    checkpoint: Annotated[Path | None, typer.Option(help=_CHECKPOINT + " (or --bundle)")] = None,
    steps: Annotated[list[int] | None, typer.Option(help="step counts to evaluate (repeatable; " + _STEPS + ")")] = None,
    num_samples: Annotated[int, typer.Option(help="images generated per step count (a text model's caption report: "
                                              "at most this many per caption set, of 240)")] = 500,
    heldout_images: Annotated[int | None, typer.Option(help="test images the held-out bits/dim is scored on, the "
                                                     "first N (default: the whole test split)")] = None,
    guidance: Annotated[float, typer.Option(help="classifier-free guidance weight")] = 0.0,
    temperature: Temperature = 1.0,
    seed: Annotated[int, typer.Option(help="seed of the trajectories and the sampling noise")] = 0,
    dataset: Annotated[str, typer.Option(help="dataset (default: the one the checkpoint was trained on)")] = "",
    label: Annotated[str, typer.Option(help="name of this model in `compare` tables")] = "",
    final: Annotated[str, typer.Option(help="exit from u-space: inverse | inverse+score | denoiser")] = "inverse",
    out: Annotated[Path, typer.Option(help="JSON report to write")] = Path("report.json"),
    device: Annotated[str, typer.Option(help=_DEVICE)] = "cpu",
    bundle: Annotated[Path | None, typer.Option(help="judge an exported bundle on the runtime instead")] = None,
    precision: Annotated[str, typer.Option(help="with --bundle: fp32 | fp16 | int8 | auto")] = "fp32",
):
    """Held-out bits/dim, Frechet distance and prompt accuracy of a checkpoint or a bundle (speed: `ntm-edge bench`)."""
    import json

    from .evaluate import evaluate_checkpoint
    from .fileio import atomic_write_text

    validate.output_file(out, "--out")  # before the work, not after it
    if (checkpoint is None) == (bundle is None):
        raise NtmError("pass exactly one of --checkpoint and --bundle")
    if bundle is not None:
        from .evaluate_bundle import evaluate_bundle

        report = evaluate_bundle(bundle, precision, steps=steps or [4], num_samples=num_samples, guidance=guidance,
                                 seed=seed, dataset=dataset or None, final=final, log=_log,
                                 temperature=temperature, heldout_images=heldout_images)
    else:
        assert checkpoint is not None  # exactly one of the two, checked above
        report = evaluate_checkpoint(_checkpoint(checkpoint), steps=steps or [4], num_samples=num_samples, guidance=guidance,
                                     seed=seed, dataset=dataset or None, final=final, device=device, log=_log,
                                     temperature=temperature, heldout_images=heldout_images)
    if label:
        report["label"] = label
    atomic_write_text(out, json.dumps(report, indent=2))
    _log(f"wrote {out}")


@app.command()
@_friendly
def compare(
    reports: Annotated[list[Path], typer.Argument(help="reports written by `ntm-edge eval`")],
    out: Annotated[Path | None, typer.Option(help="Markdown table to write")] = None,
    plot: Annotated[Path | None, typer.Option(help="PNG plot to write")] = None,
):
    """One table (and plot) of several eval reports: NTM against its baselines."""
    from .compare import compare as run

    typer.echo(run(reports, out_table=out, out_plot=plot), nl=False)


@app.command()
@_friendly
def presets():
    """List the model presets and their sizes."""
    from .config import PRESET_MODES, PRESETS

    for name, cfg in PRESETS.items():
        p, t = cfg.predictor, cfg.transporter
        typer.echo(f"{name:6s} {cfg.image_size}x{cfg.image_size}  predictor {p.backbone} "
                   f"{'x'.join(map(str, p.channels)) if p.backbone == 'unet' else f'{p.depth}x{p.width}'}  "
                   f"transporter {t.num_blocks} blocks x {t.layers_per_block} layers, width {t.width}, "
                   f"patch {t.patch_size}  mode {PRESET_MODES[name]}")



@app.command("export")
@_friendly
def export(
    checkpoint: Annotated[Path, typer.Option(help=_CHECKPOINT + " (its denoiser is exported too, if trained)")],
    out: Annotated[Path, typer.Option(help="bundle directory to write (manifest.json + one .onnx per graph)")],
    batch: Annotated[int, typer.Option(help="images per graph call the bundle is built for (opt/max batch)")] = 8,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 17,
    overwrite: Annotated[bool, typer.Option(help="replace an existing bundle directory")] = False,
    parity: Annotated[bool, typer.Option(help="check onnxruntime against torch for every graph")] = True,
    fp16: Annotated[bool, typer.Option("--fp16", help="add FP16 graphs (fp32 islands, IO kept float32)")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="add INT8 Q/DQ graphs calibrated on real trajectories")] = False,
    calib_method: Annotated[str, typer.Option(help="INT8 ranges: minmax | entropy | percentile")] = "minmax",
    calib_images: Annotated[int, typer.Option(help="training images whose trajectories calibrate INT8")] = 256,
    calib_samples: Annotated[int, typer.Option(help="sampler trajectories that calibrate INT8")] = 64,
    calib_seed: Annotated[int, typer.Option(help="seed of the calibration data and of the quality gate")] = 0,
    quality_samples: Annotated[int, typer.Option(help="samples per precision in the quality gate")] = 500,
    force: Annotated[bool, typer.Option("--force", help="keep a precision that fails the quality gate")] = False,
):
    """Export a checkpoint to an ONNX bundle for the torch-free runtime (`ntm-edge run`)."""
    from .calib.policy import PrecisionOptions
    from .export import export_bundle

    precisions = PrecisionOptions(fp16=fp16, int8=int8, calib_method=calib_method, calib_images=calib_images,
                                  calib_samples=calib_samples, calib_seed=calib_seed, quality_samples=quality_samples,
                                  force=force)
    export_bundle(_checkpoint(checkpoint), out, batch=batch, opset=opset, overwrite=overwrite, parity=parity,
                  progress=sys.stderr.isatty(), log=_log, precisions=precisions)


_NO_BUNDLE = "--bundle is required: write one with `ntm-edge export --checkpoint DIR --out BUNDLE`"


@app.command("run")
@_friendly
def run_bundle(
    prompt: Prompt,
    bundle: Annotated[Path | None, typer.Option(help="bundle directory written by `ntm-edge export` (default: the "
                                                   "model shipped in the package, assembled in $NTM_EDGE_CACHE/bundles "
                                                   "on first use)")] = None,
    num: NumImages = 16,
    steps: Steps = 4,
    seed: Seed = 0,
    guidance: Guidance = 0.0,
    temperature: Temperature = 1.0,
    final: Annotated[str, typer.Option(help="denoiser | inverse (default: " + _DEFAULT_EXIT + ")")] = "",
    inverse_method: InverseMethod = DEFAULT_METHOD,
    out: OutGrid = Path("samples.png"),
    save_array: SaveArray = None,
    provider: Annotated[str, typer.Option(help="auto (onnxruntime: tensorrt > cuda > cpu) | tensorrt (native engines, "
                                                "untested) | ort-tensorrt | cuda | cpu")] = "auto",
    audit: Annotated[bool, typer.Option(help="print the exact NLL of every generated trajectory")] = False,
    unrolled: Annotated[bool, typer.Option(help="run the four steps as the one unrolled sampler graph")] = False,
    threads: Annotated[int | None, typer.Option(help=_THREADS)] = None,
    precision: Annotated[str, typer.Option(help="auto (best the bundle holds for this provider) | fp32 | fp16 | int8")] = "auto",
):
    """Generate images on the torch-free runtime (numpy + onnxruntime) and print per-stage latency."""
    from .runtime.app import run_prompt

    run_prompt(bundle, prompt, num=num, steps=steps, seed=seed, guidance=guidance, final=final or None,
               inverse_method=inverse_method, out=out, save_array_to=save_array, provider=provider, audit=audit,
               unrolled=unrolled, threads=threads, precision=precision, log=_log, warn=_warn,
               temperature=temperature)


@app.command("audit")
@_friendly
def audit_image(
    image: Annotated[Path, typer.Option(help="PNG of one image, or .npy of uint8 images (N, H, W, C)")],
    prompt: Annotated[str, typer.Option(help="the class to score the image(s) under; '' for unconditional")],
    bundle: Annotated[Path | None, typer.Option(help="bundle directory written by `ntm-edge export` (required)")] = None,
    steps: Annotated[int | None, typer.Option(help="coarse steps T of the trajectories (default: the model's; "
                                                  "at most 39 at t_min 0.025)")] = None,
    trajectories: Annotated[int, typer.Option(help="forward trajectories averaged per image")] = 4,
    seed: Annotated[int, typer.Option(help="seed of the dequantisation and trajectory noise")] = 0,
    provider: Annotated[str, typer.Option(help="execution provider: auto | tensorrt | cuda | cpu")] = "auto",
    threads: Annotated[int | None, typer.Option(help=_THREADS)] = None,
    precision: Annotated[str, typer.Option(help="fp32 | fp16 | int8 | auto")] = "fp32",
):
    """Bits/dim bound on -log p(image | prompt), on the runtime (the variational bound of docs/design.md 4)."""
    if bundle is None:
        raise NtmError(_NO_BUNDLE)
    from .runtime.app import audit_images

    audit_images(bundle, image, prompt, steps=steps, trajectories=trajectories, seed=seed, provider=provider,
                 threads=threads, precision=precision, log=_log, warn=_warn)


@app.command("bench")
@_friendly
def bench(
    out: Annotated[Path, typer.Option(help="report directory (report.md, report.png, benchmark.json); only an "
                                           "earlier bench report there is ever replaced")],
    checkpoint: Annotated[Path | None, typer.Option(
        help="checkpoint to time, or `default` (default: an untrained --preset model)")] = None,
    bundle: Annotated[Path | None, typer.Option(help="bundle for the onnxruntime rows (default: exported from "
                                                     "the checkpoint)")] = None,
    preset: Annotated[str, typer.Option(help="preset of the untrained model timed when no checkpoint is given")] = "small",
    quick: Annotated[bool, typer.Option(help="3 rounds per benchmark: a check that everything runs, rough figures")] = False,
    threads: Annotated[int | None, typer.Option(help="torch and onnxruntime threads (default: $OMP_NUM_THREADS, "
                                                     "else all cores)")] = None,
    note: Annotated[str, typer.Option(help="a line for the top of report.md (e.g. the machine's load)")] = "",
):
    """Latency per stage, backend and batch size (pytest-benchmark), speed ratios against torch eager and the
    distance to the machine's peak. GPU rows (CUDA graphs, autocast) run where CUDA exists; untested so far."""
    from .bench import run_bench

    checkpoint = _checkpoint(checkpoint) if checkpoint else None
    run_bench(out, checkpoint, bundle, preset, quick, threads, note, progress=sys.stderr.isatty(), log=_log)



@app.command("build-engines")
@_friendly
def build_engines(
    bundle: Annotated[Path, typer.Option(help="bundle directory written by `ntm-edge export`")],
    precision: Annotated[list[str] | None, typer.Option(help="fp32 | fp16 | int8 (repeatable; default: all it holds)")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="profiles over the spec's min..max batch (default: static)")] = False,
    workspace_mb: Annotated[int, typer.Option(help="TensorRT builder workspace in MiB")] = 1024,
):
    """Build TensorRT engines (strongly typed) from a bundle into BUNDLE/engines/. Untested: no TensorRT here."""
    from .calib.engines import build_engines as run

    run(bundle, precisions=precision or None, dynamic=dynamic, workspace_mb=workspace_mb, log=_log)


def main() -> None:
    try:
        app()
    except SystemExit as e:  # typer ends every command this way, with its exit status
        distributed = sys.modules.get(f"{__package__}.distributed")  # loaded only by commands that train
        if distributed is not None:  # a torchrun worker that used gloo ends here (os._exit; see end_process)
            distributed.end_process(e.code if isinstance(e.code, int) else 0 if e.code is None else 1)
        raise
