"""Sampling latency of two checkpoints side by side: the whole 4-step sampler and its exit, in one process,
one torch thread, the two models alternating within each repeat so that both see the same machine.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampling_speed.py runs/small-pw4-s0 runs/small-ctx-pw4-s0

Made to price the contextual transporter (``train --transporter-context``), whose sampler inverts f_T at
every step instead of once: prints the median over ``--repeats`` per batch size and the ratio of the
second model's time to the first's (docs/transporter-study.md, "A transporter that reads the context").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ntm_edge.exits import sample_images
from ntm_edge.model import NTM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first", help="checkpoint directory (the reference)")
    ap.add_argument("second", help="checkpoint directory (timed against the first)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = {path: NTM.from_pretrained(path).eval() for path in (args.first, args.second)}
    for B in args.batches:
        prompts = [str(i % 10) for i in range(B)]
        times: dict[str, list[float]] = {path: [] for path in models}
        for m in models.values():
            sample_images(m, prompts, steps=args.steps, seed=0)  # warm-up
        for _ in range(args.repeats):
            for path, m in models.items():
                start = time.perf_counter()
                sample_images(m, prompts, steps=args.steps, seed=0)
                times[path].append(time.perf_counter() - start)
        a, b = (statistics.median(times[p]) for p in (args.first, args.second))
        print(f"batch {B}: {args.first} {a * 1e3:.1f} ms, {args.second} {b * 1e3:.1f} ms, ratio {b / a:.2f}x")


if __name__ == "__main__":
    main()
