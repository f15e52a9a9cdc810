"""fp32 / fp16 / int8 of one bundle on onnxruntime CPU, measured side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/precision_cpu.py --bundle runs/small-bundle \
        --checkpoint runs/small [--samples 500] [--out benchmarks/reports/precision_cpu_small.txt]

The bundle must hold all three precisions (`ntm-edge export --fp16 --int8`). Prints three tables:

1. Per graph: file size, median latency at batch 1 and 64 (every precision timed in the same rounds,
   interleaved, one thread), speed-up over fp32, and the largest |output - fp32 output| on real inputs
   (the calibration capture of calib/capture.py: forward trajectories of training images and the
   sampler's own trajectories).
2. End to end (the runtime's four steps + Jacobi inverse, guidance 0): ms per image at batch 1 and 64,
   and the quality gate of calib/quality.py on `--samples` images from identical noise: PSNR against
   fp32, prompt accuracy, Frechet distance, audit bits/dim shift.
3. The transporter in INT8 (what the policy keeps out of INT8 bundles): its graphs quantized with the
   same rule, latency and error; the Jacobi inversion (passes, error against the exact inverse);
   the audit's bits/dim with an int8 transporter.
Tests never assert on time; this script only reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from ntm_edge import NTM
from ntm_edge.calib.capture import calibration_batches
from ntm_edge.calib.int8 import quantize_int8
from ntm_edge.calib.policy import PrecisionOptions
from ntm_edge.calib.quality import quality_gate
from ntm_edge.export.parity import random_inputs
from ntm_edge.runtime import Runtime, load_bundle
from ntm_edge.runtime.audit import image_bound
from ntm_edge.runtime.bundle import Bundle
from ntm_edge.runtime.inversion import invert
from ntm_edge.runtime.sampler import generate
from ntm_edge.runtime.session import Graph

PRECISIONS = ("fp32", "fp16", "int8")
CAPTURED = ("predictor_step", "sampler_loop", "transporter_forward", "transporter_jacobi_0", "transporter_jacobi_1",
            "denoiser")


def interleaved(calls: Mapping[str, Callable[..., object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each call, all timed in the same rounds (one call of each per round)."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def inputs_for(name: str, spec, cfg, captured: dict, batch: int) -> dict[str, np.ndarray]:
    """Real inputs (captured) for a graph at ``batch`` rows, random ones where nothing is captured."""
    if name not in captured:
        return random_inputs(spec, cfg, batch, np.random.default_rng(0))
    out = {}
    for t in spec.inputs:
        if t.dynamic_axes.get(0) == "batch":
            rows = np.concatenate([b[t.name] for b in captured[name]])
            out[t.name] = np.resize(rows, (batch, *rows.shape[1:])) if len(rows) < batch else rows[:batch]
        else:
            out[t.name] = captured[name][0][t.name]
    return out


def per_graph(bundle: Bundle, captured: dict, threads: int, rounds: tuple[int, int], log) -> list[dict]:
    rows = []
    for name, entry in bundle.manifest["graphs"].items():
        spec = bundle.graphs[name]
        files = {p: entry["variants"][p]["file"] for p in PRECISIONS}
        graphs = {p: Graph(spec, bundle.root / files[p], ["CPUExecutionProvider"], threads) for p in PRECISIONS}
        row = {"graph": name, "runs": {p: entry["variants"][p].get("runs", p) for p in PRECISIONS},
               "size": {p: (bundle.root / files[p]).stat().st_size for p in PRECISIONS}}
        for b, r in zip((1, 64), rounds, strict=True):
            feed = inputs_for(name, spec, bundle.config, captured, b)
            ref = graphs["fp32"](**feed)
            row[f"err_b{b}"] = {p: max(float(np.max(np.abs(graphs[p](**feed)[k] - ref[k]))) for k in ref) for p in PRECISIONS}
            calls = {p: (lambda g=g, feed=feed: g(**feed)) for p, g in graphs.items()}
            row[f"ms_b{b}"] = {p: 1e3 * t for p, t in interleaved(calls, r).items()}
        rows.append(row)
        log(f"  timed {name}")
    return rows


def end_to_end(bundle: Bundle, threads: int, rounds: tuple[int, int]) -> dict:
    out = {}
    for b, r in zip((1, 64), rounds, strict=True):
        batched = dataclasses.replace(bundle, manifest={**bundle.manifest, "batch": b})  # b images per graph call
        rts = {p: Runtime(batched, "cpu", threads, p) for p in PRECISIONS}
        prompts = [str(i % 10) for i in range(b)]
        calls = {p: (lambda rt=rt, prompts=prompts: generate(rt, prompts, seed=0, final="inverse")) for p, rt in rts.items()}
        secs = interleaved(calls, r)
        out[f"ms_per_image_b{b}"] = {p: 1e3 * s / b for p, s in secs.items()}
    return out


def transporter_int8(bundle: Bundle, model: NTM, checkpoint, captured: dict, threads: int, log) -> dict:
    """Quantize the transporter graphs with the bundle's rule and measure what it does to inversion and audit."""
    tmp = Path(tempfile.mkdtemp(prefix="ntm-trans-int8-"))
    try:
        for f in bundle.root.glob("*.onnx"):
            shutil.copy(f, tmp / f.name)
        manifest = json.loads(json.dumps(bundle.manifest))
        for name in ("transporter_forward", "transporter_jacobi_0", "transporter_jacobi_1"):
            info = quantize_int8(tmp / f"{name}.fp32.onnx", tmp / f"{name}.int8.onnx", captured[name], "minmax",
                                 tmp / f"{name}.ranges.json")
            manifest["graphs"][name]["variants"]["int8"] = {"file": f"{name}.int8.onnx", "runs": "int8"}
            log(f"  {name}: {info['quantized']} nodes quantized")
        qb = Bundle(tmp, manifest, bundle.config, bundle.graphs)
        rts = {p: Runtime(qb, "cpu", threads, p) for p in PRECISIONS}
        # the exact inverse of real levels: x at every level of forward trajectories of training images
        fwd = captured["transporter_forward"][0]
        x, t = fwd["x"], fwd["t"]
        steps = int(fwd["steps"][0])
        u = rts["fp32"]["transporter_forward"](**fwd)["u"]
        inv = {}
        for p, rt in rts.items():
            start = time.perf_counter()
            x_hat, passes = invert(rt, u, t, steps, "jacobi")
            ms = 1e3 * (time.perf_counter() - start)
            inv[p] = {"passes": passes, "max_abs_err": float(np.max(np.abs(x_hat - x))), "ms": ms}
        from ntm_edge.data import load_dataset

        test = load_dataset(bundle.manifest["source"]["dataset"], "test", image_size=bundle.config.image_size,
                            channels=bundle.config.channels)
        prompts = [bundle.config.prompt.class_names[k] for k in test.labels[:100]]
        bits = {}
        for p in PRECISIONS:  # every other graph in fp32: only the transporter changes
            m = json.loads(json.dumps(manifest))
            m["graphs"]["transporter_forward"]["variants"]["fp32"] = manifest["graphs"]["transporter_forward"]["variants"][p]
            mixed = Runtime(Bundle(tmp, m, bundle.config, bundle.graphs), "cpu", threads, "fp32")
            bits[p] = float(np.mean(image_bound(mixed, test.images[:100], prompts, trajectories=1, seed=0)["bits_per_dim"]))
        return {"inversion": inv, "bits_per_dim": bits}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fmt_tables(graphs: list[dict], e2e: dict, gate: dict, trans: dict, header: str) -> str:
    lines = [header, "", "per graph (onnxruntime CPU; ms = median; x = speed-up over fp32 measured in the same rounds)"]
    lines.append(f"{'graph':<22}{'prec':>6}{'runs':>6}{'KiB':>8}{'size':>7}{'ms b1':>9}{'x b1':>7}{'ms b64':>10}{'x b64':>7}"
                 f"{'max|d| b64':>12}")
    for r in graphs:
        for p in PRECISIONS:
            lines.append(f"{r['graph']:<22}{p:>6}{r['runs'][p]:>6}{r['size'][p] / 1024:>8.0f}"
                         f"{r['size'][p] / r['size']['fp32']:>6.2f}x{r['ms_b1'][p]:>9.2f}"
                         f"{r['ms_b1']['fp32'] / r['ms_b1'][p]:>6.2f}x{r['ms_b64'][p]:>10.1f}"
                         f"{r['ms_b64']['fp32'] / r['ms_b64'][p]:>6.2f}x{r['err_b64'][p]:>12.2e}")
    rows = {r["precision"]: r for r in gate["rows"]}
    lines += ["", f"end to end (4 steps + Jacobi inverse, guidance 0; quality: {gate['samples']} samples on identical noise, "
                  f"bits/dim on {gate['audit_images']} held-out images)"]
    lines.append(f"{'prec':<6}{'ms/img b1':>10}{'x b1':>7}{'ms/img b64':>11}{'x b64':>7}{'PSNR dB':>9}{'prompt acc':>11}"
                 f"{'Frechet':>9}{'vs fp32':>9}{'bits/dim':>10}{'shift':>9}")
    for p in PRECISIONS:
        b1, b64, g = e2e["ms_per_image_b1"], e2e["ms_per_image_b64"], rows[p]
        psnr = "-" if g["psnr_db"] is None else f"{g['psnr_db']:.1f}"
        lines.append(f"{p:<6}{b1[p]:>10.2f}{b1['fp32'] / b1[p]:>6.2f}x{b64[p]:>11.2f}{b64['fp32'] / b64[p]:>6.2f}x{psnr:>9}"
                     f"{g['prompt_accuracy']:>11.3f}{g['frechet']:>9.2f}{g['frechet'] / rows['fp32']['frechet'] - 1:>+8.1%}"
                     f"{g['bits_per_dim']:>10.3f}{g['bits_per_dim_shift']:>+9.4f}")
    lines += ["", "the transporter in int8 (not shipped): exact inverse of real levels by Jacobi, and the audit with "
                  "an int8 transporter (predictor fp32)"]
    lines.append(f"{'transporter':<12}{'passes':>12}{'max|x - x_true|':>17}{'ms':>9}{'bits/dim':>10}{'shift':>9}")
    for p in PRECISIONS:
        inv, bits = trans["inversion"][p], trans["bits_per_dim"]
        lines.append(f"{p:<12}{'+'.join(map(str, inv['passes'])):>12}{inv['max_abs_err']:>17.2e}{inv['ms']:>9.1f}"
                     f"{bits[p]:>10.3f}{bits[p] - bits['fp32']:>+9.4f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--rounds", type=int, nargs=2, default=(30, 7), help="timing rounds at batch 1 and batch 64")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    bundle = load_bundle(args.bundle)
    model = NTM.from_pretrained(args.checkpoint).requires_grad_(False)
    log("capturing real inputs")
    specs = {n: bundle.graphs[n] for n in CAPTURED if n in bundle.graphs}
    captured = calibration_batches(model, args.checkpoint, specs, PrecisionOptions(calib_images=64, calib_samples=16,
                                                                                   calib_seed=1))
    log("per graph")
    graphs = per_graph(bundle, captured, args.threads, tuple(args.rounds), log)
    log("end to end")
    e2e = end_to_end(bundle, args.threads, (args.rounds[0] // 3, max(2, args.rounds[1] // 2)))
    log("quality gate")
    gate = quality_gate(bundle, args.checkpoint, PrecisionOptions(fp16=True, int8=True, quality_samples=args.samples),
                        log=log)
    log("transporter in int8")
    trans = transporter_int8(bundle, model, args.checkpoint, captured, args.threads, log)
    import onnxruntime

    header = (f"{args.bundle} ({args.checkpoint}), onnxruntime {onnxruntime.__version__} CPU, {args.threads} thread(s), "
              f"rounds b1/b64 {args.rounds[0]}/{args.rounds[1]}")
    text = fmt_tables(graphs, e2e, gate, trans, header)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
