"""Sampling latency of two models side by side: the whole 4-step sampler and its exit, in one process,
one thread, the two models alternating within each repeat so that both see the same machine. Each is a
checkpoint (the torch sampler) or a bundle (the torch-free runtime on onnxruntime's CPU provider, in
``--precision``, inverse exit).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampling_speed.py runs/small-pw4-s0 runs/small-ctx-pw4-s0
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampling_speed.py bundles/small-pw4-s0 bundles/small-ctx-pw4-s0 \
        --batches 1 8

Made to price the contextual transporter (``train --transporter-context``), whose sampler inverts f_T at
every step instead of once: prints the median over ``--repeats`` per batch size and the ratio of the
second model's time to the first's (docs/transporter-study.md, "A transporter that reads the context").
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ntm_edge.exits import sample_images
from ntm_edge.model import NTM


def sampler(path: str, steps: int, precision: str):
    """prompts -> images: the runtime's ``generate`` for a bundle (a manifest.json), else the torch sampler."""
    if (Path(path) / "manifest.json").is_file():
        from ntm_edge.runtime.sampler import generate
        from ntm_edge.runtime.session import open_runtime

        rt = open_runtime(path, provider="cpu", threads=1, precision=precision)
        return lambda prompts: generate(rt, prompts, steps, seed=0, final="inverse").images
    model = NTM.from_pretrained(path).eval()
    return lambda prompts: sample_images(model, prompts, steps=steps, seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first", help="checkpoint or bundle directory (the reference)")
    ap.add_argument("second", help="checkpoint or bundle directory (timed against the first)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"], help="of a bundle")
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = {path: sampler(path, args.steps, args.precision) for path in (args.first, args.second)}
    for B in args.batches:
        prompts = [str(i % 10) for i in range(B)]
        times: dict[str, list[float]] = {path: [] for path in models}
        for draw in models.values():
            draw(prompts)  # warm-up
        for _ in range(args.repeats):
            for path, draw in models.items():
                start = time.perf_counter()
                draw(prompts)
                times[path].append(time.perf_counter() - start)
        a, b = (statistics.median(times[p]) for p in (args.first, args.second))
        print(f"batch {B}: {args.first} {a * 1e3:.1f} ms, {args.second} {b * 1e3:.1f} ms, ratio {b / a:.2f}x")


if __name__ == "__main__":
    main()
