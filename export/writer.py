"""`ntm-edge export`: checkpoint -> bundle directory (manifest.json + one ONNX file per graph).

0. Refuse what can be refused before any work (``_check_options``): the options, an ``--out`` that
   overlaps the checkpoint, and an existing ``--out`` that is not an ntm-edge bundle of its own files
   (``--overwrite`` replaces only such a bundle). Remove the temporaries of a killed export there.
1. Load the checkpoint (and its denoiser, when it has one) and list the graphs with their IO specs
   (``runtime.specs.graph_specs``).
2. Trace each graph's pure module with the TorchScript exporter (``dynamo=False``: the dynamo exporter
   needs onnxscript), dynamic batch axis, and verify the file with ``onnx.checker`` (full check);
   simplify it with onnxslim (export/simplify.py) and check it again.
3. Parity: onnxruntime against torch on random inputs and on real trajectories (export/parity.py).
4. Write manifest.json (format version, config, schedule, vocabulary, graphs, opset, versions,
   parity, sha256 of every file, and the sha256 of its own content: ``bundle.seal``) last, into a
   temporary directory that is then renamed into place: a bundle is complete or absent, never
   half-written.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from ntm_edge import __version__, schedule, validate
from ntm_edge.calib.build import build_precisions
from ntm_edge.calib.build import check_inputs as check_precision_inputs
from ntm_edge.calib.policy import PrecisionOptions
from ntm_edge.calib.trt_ops import TENSORRT_VERSION
from ntm_edge.checkpoint import load_info, trained_on, trained_steps
from ntm_edge.errors import ConfigError, NtmError
from ntm_edge.fileio import atomic_write_text, make_temp_dir, publish_dir, remove_stale_temporaries, sha256_file
from ntm_edge.model import NTM
from ntm_edge.prompts import TextVocab
from ntm_edge.runtime import bundle as B
from ntm_edge.runtime import specs as S
from ntm_edge.runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, Bundle, is_bundle, owned_files, seal
from ntm_edge.runtime.session import Runtime
from ntm_edge.sampling import NOISE_BATCH
from ntm_edge.text_tokenizer import encoder_files

from .graphs import graph_modules
from .parity import MIN_TEXT_COSINE, max_abs, random_inputs, real_parity, real_trajectories, text_encoder_agreement, torch_outputs
from .simplify import simplify_file
from .simplify import summary as simplify_summary

DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention
PRECISION = "fp32"
# parity tolerance: max abs error <= ATOL + RTOL * max|reference| (float32 graphs of a few hundred ops)
ATOL, RTOL = 1e-4, 1e-4


class ExportError(NtmError):
    """An export that cannot be done, or whose graphs do not match the torch model."""


def export_bundle(checkpoint, out, batch: int = 8, opset: int = DEFAULT_OPSET, overwrite: bool = False,
                  parity: bool = True, seed: int = 0, progress: bool = False, log=print,
                  precisions: PrecisionOptions | None = None) -> dict:
    """Export ``checkpoint`` to the bundle directory ``out``; returns the manifest. ``precisions``: the
    fp16/int8 passes, calibration and quality gate (ntm_edge.calib), after the fp32 graphs."""
    from ntm_edge.denoiser import has_denoiser, load_denoiser

    out = Path(out)
    _check_options(out, Path(checkpoint), batch, opset, overwrite)
    precisions = precisions or PrecisionOptions()
    check_precision_inputs(checkpoint, precisions)
    remove_stale_temporaries(out.parent, out.name)  # what a killed export left next to ``out``
    model = NTM.from_pretrained(checkpoint).requires_grad_(False)
    cfg = model.config
    if cfg.objective == "fm":
        raise ConfigError("a flow-matching checkpoint has no u-space sampler to export; export an NTM (or gaussian) model")
    # the traced example inputs alone (the sampler loop's noise is the largest), before any tracing
    validate.fits_in_memory(4 * 2 * batch * (cfg.steps + 2) * cfg.dims, f"--batch {batch}")
    denoiser = load_denoiser(checkpoint).requires_grad_(False) if has_denoiser(checkpoint) else None
    graph_specs = S.graph_specs(cfg, batch, has_denoiser=denoiser is not None)
    modules = graph_modules(model, denoiser)
    manifest = _manifest(checkpoint, model, denoiser, graph_specs, batch, opset, precisions)
    tmp = make_temp_dir(out.parent, out.name)
    try:
        bar = _progress(progress)
        with bar:
            task = bar.add_task("export", total=len(graph_specs))
            rng = np.random.default_rng(seed)
            simplified = {}
            for name, spec in graph_specs.items():
                path = tmp / f"{name}.{PRECISION}.onnx"
                if name == S.PROMPT_ENCODER and cfg.prompt.kind != "label":
                    # the frozen MiniLM: built without torch, byte for byte the file the runtime builds
                    _build_text_encoder(path, opset)
                else:
                    _export_graph(modules[name], spec, random_inputs(spec, cfg, batch, rng), path, opset)
                    simplified[name] = simplify_file(path)  # before parity and precision passes
                bar.advance(task)
        manifest["simplify"] = {"tool": "onnxslim", "graphs": simplified}
        log(simplify_summary(simplified))
        if cfg.prompt.kind != "label":  # the runtime tokenises with the very tokenizer the model was trained with
            shutil.copyfile(encoder_files().tokenizer, tmp / B.TOKENIZER)
        bundle = Bundle(tmp, manifest, cfg, graph_specs)
        if parity:
            manifest["parity"] = check_parity(bundle, model, modules, checkpoint, seed, log)
        if precisions.precisions:
            manifest["precision"] = build_precisions(bundle, model, checkpoint, denoiser, precisions, log)
        manifest["files"] = {p.name: sha256_file(p) for p in sorted([*tmp.glob("*.onnx"), *tmp.glob(B.TOKENIZER)])}
        atomic_write_text(tmp / MANIFEST, json.dumps(seal(manifest), indent=2))
        (tmp / MANIFEST).chmod(0o644)
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    log(f"wrote {out} ({len(graph_specs)} graphs, opset {opset}, {', '.join(manifest['precisions'])}, {size:.1f} MiB)")
    return manifest


def supported_opsets() -> tuple[int, int]:
    """[lowest, highest] opset: scaled_dot_product_attention needs MIN_OPSET; the top is the lower of what
    this torch's exporter and this onnx support (opsets past torch's refuse to export)."""
    import onnx

    torch_max = getattr(getattr(torch.onnx, "_constants", None), "ONNX_MAX_OPSET", 20)
    return MIN_OPSET, min(torch_max, onnx.defs.onnx_opset_version())


def _check_options(out: Path, checkpoint: Path, batch: int, opset: int, overwrite: bool) -> None:
    """Everything that can be refused before any work: the options, and ``out``. ``--overwrite`` replaces
    only a directory that is an ntm-edge bundle and holds nothing else; ``out`` and the checkpoint never
    contain one another."""
    validate.count(batch, "--batch")
    validate.opset(opset, *supported_opsets())
    target, source = out.resolve(), checkpoint.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise ConfigError(f"--out {out} and --checkpoint {checkpoint} overlap; write the bundle to a directory "
                          f"outside the checkpoint (and not containing it)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not is_bundle(out):
            raise ConfigError(f"{out} already exists and is not an ntm-edge bundle (no manifest.json of format "
                              f"{FORMAT!r}); --overwrite replaces only a bundle: choose another --out")
        if not overwrite:
            raise ConfigError(f"{out} already exists and is not empty; pass --overwrite to replace it")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in owned_files(out))
        if foreign:
            raise ConfigError(f"{out} is a bundle but also holds {len(foreign)} file(s) that are not part of it "
                              f"(e.g. {foreign[0]!r}); --overwrite will not delete them: move them or choose another --out")
    validate.writable_parent(out, "--out")


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), disable=not enabled)


def _export_graph(module, spec: S.GraphSpec, example: dict[str, np.ndarray], path: Path, opset: int) -> None:
    """Trace one pure module to ``path`` with the spec's names and dynamic axes; verify it with onnx.checker."""
    import onnx

    args = tuple(torch.from_numpy(example[n]) for n in spec.input_names)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
        try:
            torch.onnx.export(module, args, str(path), input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_axes=spec.dynamic_axes(), opset_version=opset, do_constant_folding=True,
                              dynamo=False)
        except torch.onnx.errors.OnnxExporterError as e:  # e.g. an operator that this opset lacks
            raise ExportError(f"graph {spec.name} cannot be exported at opset {opset} ({str(e).splitlines()[0]})") from None
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the exported graph {spec.name} does not pass onnx.checker ({str(e).splitlines()[0]})") from None


def _build_text_encoder(path: Path, opset: int) -> None:
    """The text prompt encoder graph by ``runtime.text_graph`` (no trace, no onnxslim: its bytes are the
    builder's, so a runtime that builds it gets the sha256 of the manifest), checked by onnx.checker."""
    import onnx

    from ntm_edge.runtime.text_graph import supported_opsets as text_opsets
    from ntm_edge.runtime.text_graph import write_text_encoder_onnx

    lo, hi = text_opsets()
    if not lo <= opset <= hi:
        raise ExportError(f"the text encoder graph is built for opsets {lo} .. {hi}; choose --opset in that range")
    write_text_encoder_onnx(path, opset)
    onnx.checker.check_model(str(path), full_check=True)


def check_parity(bundle: Bundle, model: NTM, modules: dict, checkpoint, seed: int = 0, log=print) -> dict:
    """onnxruntime vs torch for every graph, random inputs (batch 3) and real trajectories -> the
    manifest's ``parity`` entry; raises ExportError past ATOL + RTOL * scale."""
    rt = Runtime(bundle, provider="cpu")
    rng = np.random.default_rng(seed + 1)
    traj, ids, source = real_trajectories(model, checkpoint, seed=seed)
    real = real_parity(rt, model, modules, traj, ids, seed)
    report = {"real_source": source, "tolerance": {"atol": ATOL, "rtol": RTOL}, "graphs": {}}
    log(f"parity, onnxruntime vs torch (max abs error; real: {source}):")
    vocab = bundle.vocab
    if isinstance(vocab, TextVocab):
        report["text_encoder"] = text = text_encoder_agreement(rt, modules[S.PROMPT_ENCODER], vocab)
        log(f"  text encoder: {text['prompts']} prompts, {text['tokens']} tokens, min cosine {text['min_cosine']:.6f}, "
            f"max abs {text['max_abs']:.2e}")
        if not (text["min_cosine"] > MIN_TEXT_COSINE and text["padding_zero"]):
            raise ExportError(f"the text encoder graph differs from the torch MiniLM (min cosine {text['min_cosine']:.6f}, "
                              f"padding zero: {text['padding_zero']}); the export is not faithful")
    for name, spec in bundle.graphs.items():
        inputs = random_inputs(spec, bundle.config, 3, rng)  # a batch other than the traced one
        rand = max_abs(rt[name](**inputs), torch_outputs(modules[name], spec, inputs))
        entry = {"random": {"max_abs": rand[0], "scale": rand[1]}, "real": {"max_abs": real[name][0], "scale": real[name][1]}}
        report["graphs"][name] = entry
        log(f"  {name:24s} random {rand[0]:.2e} (scale {rand[1]:.1e})   real {real[name][0]:.2e} (scale {real[name][1]:.1e})")
        for kind, (err, scale) in (("random", rand), ("real", real[name])):
            if not err <= ATOL + RTOL * scale:
                raise ExportError(f"graph {name} differs from torch by {err:.2e} on {kind} inputs "
                                  f"(tolerance {ATOL + RTOL * scale:.1e}); the export is not faithful")
    return report


def _manifest(checkpoint, model: NTM, denoiser, graph_specs: dict, batch: int, opset: int,
              precisions: PrecisionOptions) -> dict:
    import onnx
    import onnxruntime
    import onnxslim

    cfg, tr = model.config, model.transporter
    versions = {"ntm_edge": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__, "onnxslim": onnxslim.__version__, "numpy": np.__version__}
    if precisions.precisions:
        versions["tensorrt_op_table"] = TENSORRT_VERSION
    source = {"checkpoint": str(Path(checkpoint).resolve()), "dataset": trained_on(checkpoint),
              "weights_sha256": load_info(checkpoint).get("weights_sha256"),
              "denoiser_sha256": sha256_file(Path(checkpoint) / "denoiser.safetensors") if denoiser is not None else None}
    options = {"batch": batch, "opset": opset, "precisions": [PRECISION, *precisions.precisions]}
    if precisions.precisions:  # what the fp16/int8 files depend on
        options["precision_options"] = {k: v for k, v in dataclasses.asdict(precisions).items() if k != "force"}
    # content key: the weights, the export options and the versions that produced the files
    key = hashlib.sha256(json.dumps({"source": {k: v for k, v in source.items() if k != "checkpoint"},
                                     "options": options, "versions": versions}, sort_keys=True).encode()).hexdigest()
    blocks = list(tr.blocks)
    tc = cfg.transporter
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": key,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "source": source,
        **options,
        "config": cfg.to_dict(),
        "schedule": {"steps": cfg.steps, "shift": cfg.shift, "t_min_sample": cfg.t_min_sample,
                     "levels_t": schedule.time_grid(cfg.steps, cfg.t_min_sample, cfg.shift).tolist(),
                     "noise_batch": NOISE_BATCH, "trained_steps": trained_steps(checkpoint)},
        "prompts": {**B.prompts_entry(cfg), **({"encoder_sha256": model.prompt_encoder.encoder_sha256}
                                             if cfg.prompt.kind != "label" else {})},
        "transporter": {"num_blocks": len(blocks), "patch_size": tc.patch_size, "num_tokens": tr.num_tokens,
                        "token_dim": cfg.channels * tc.patch_size**2, "layers": tc.layers_per_block,
                        "heads": tc.heads, "head_dim": tc.width // tc.heads, "flip": [b.flip for b in blocks]},
        "denoiser": None if denoiser is None else {"t0": denoiser.config.t0, "steps": denoiser.config.steps},
        "graphs": {name: {**spec.to_dict(), "variants": {PRECISION: {"file": f"{name}.{PRECISION}.onnx"}}}
                   for name, spec in graph_specs.items()},
    }

