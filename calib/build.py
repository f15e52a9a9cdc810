"""The precision passes of `ntm-edge export --fp16 --int8`, run on the bundle directory being written.

1. Every graph is already exported, simplified (export/simplify.py) and parity-checked in fp32.
2. FP16: each graph whose policy (calib/policy.py) says fp16 is converted (calib/fp16.py).
3. INT8: the calibration cache is looked up ($NTM_EDGE_CACHE/calib/<key>); on a miss the calibration
   inputs are captured from real trajectories (calib/capture.py). Each graph whose policy says int8
   is quantized (calib/int8.py); the ranges land in the cache, with settings.json beside them.
4. Every graph's ``variants`` entry gets, per precision, the file it runs and why (a graph that stays
   fp32 in an INT8 bundle points at its fp32 file).
5. The static TensorRT checks (calib/trt_check.py) and the quality gate (calib/quality.py) run; their
   results go into the manifest.
"""

from __future__ import annotations

import json

from ..fileio import atomic_write_text
from ..runtime.bundle import Bundle
from .fp16 import convert_fp16
from .int8 import calibration_dir, calibration_key, graph_fingerprint, quantize_int8
from .policy import PrecisionOptions, runs_in


def check_inputs(checkpoint, opts: PrecisionOptions) -> None:
    """What the passes need, checked before any long work: valid options; the checkpoint's dataset
    (calibration draws from its training split, the gate scores against its test split)."""
    from ..checkpoint import trained_on
    from ..errors import ConfigError

    opts.validate()
    if opts.precisions and trained_on(checkpoint) is None:
        raise ConfigError(f"{checkpoint} does not record its dataset: --fp16/--int8 calibrate and judge on it")


def build_precisions(bundle: Bundle, model, checkpoint, denoiser, opts: PrecisionOptions, log=print) -> dict:
    """Write the fp16/int8 files into ``bundle.root`` and their variants into ``bundle.manifest``;
    -> the manifest's ``precision`` entry (per graph: what it runs in; calibration; TensorRT checks; quality)."""
    from .quality import quality_gate
    from .trt_check import check_bundle

    root, graphs = bundle.root, bundle.manifest["graphs"]
    report: dict = {"islands": "ntm_edge.islands", "graphs": {}}
    for precision in opts.precisions:
        todo = [name for name in graphs if runs_in(name, precision)[0] == precision]
        if precision == "int8":
            report["calibration"] = _int8(bundle, todo, model, checkpoint, denoiser, opts, log)
        for name in todo:
            if precision == "fp16":
                info = convert_fp16(root / f"{name}.fp32.onnx", root / f"{name}.fp16.onnx")
                report["graphs"].setdefault(name, {})["fp16"] = info
        for name, entry in graphs.items():
            runs, why = runs_in(name, precision)
            entry["variants"][precision] = {"file": f"{name}.{runs}.onnx", "runs": runs, "why": why}
        log(f"{precision}: " + ", ".join(f"{name} {runs_in(name, precision)[0]}" for name in graphs))
    report["tensorrt_checks"] = checks = check_bundle(bundle)
    problems = [f"{f}: {p}" for f, v in checks["files"].items() for p in v["problems"]]
    log(f"TensorRT {checks['tensorrt']} static checks: " + ("all files pass" if not problems else
        f"{len(problems)} problems (the bundle still runs on onnxruntime), e.g. {problems[0]}"))
    report["quality"] = quality_gate(bundle, checkpoint, opts, log)
    return report


def _int8(bundle: Bundle, names: list[str], model, checkpoint, denoiser, opts: PrecisionOptions, log) -> dict:
    """Quantize ``names``: ranges from the cache when the key matches, else captured and calibrated."""
    from ..checkpoint import load_info

    root = bundle.root
    settings = {**opts.calibration_settings(), "graphs": names}
    fp32 = {name: graph_fingerprint(root / f"{name}.fp32.onnx") for name in names}
    key = calibration_key(load_info(checkpoint).get("weights_sha256") or "", fp32, settings)
    cache = calibration_dir(key)
    cached = (cache / "settings.json").is_file() and all((cache / f"{n}.json").is_file() for n in names)
    batches = None
    if cached:
        log(f"int8: calibration ranges reused from {cache}")
    else:
        from .capture import calibration_batches

        log(f"int8: capturing calibration inputs ({opts.calib_images} training images at every level, "
            f"{opts.calib_samples} sampler trajectories, seed {opts.calib_seed})")
        specs = {name: bundle.graphs[name] for name in names}
        batches = calibration_batches(model, checkpoint, specs, opts, denoiser)
    for name in names:
        info = quantize_int8(root / f"{name}.fp32.onnx", root / f"{name}.int8.onnx",
                             None if batches is None else batches[name], opts.calib_method, cache / f"{name}.json")
        log(f"int8: {name}: {info['quantized']} nodes quantized ({opts.calib_method})")
    if not cached:
        atomic_write_text(cache / "settings.json", json.dumps({"key": key, **settings, "fp32_fingerprints": fp32}, indent=2))
    return {"key": key, "cache": str(cache), "reused": cached, **settings}

