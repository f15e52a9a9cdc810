"""`make demo`: the default model on the runtime for a few prompts (torch-free).

    python -m ntm_edge.runtime.demo [--out demo.png] [--num 8] [--guidance W] [--threads N]

One grid, a row per prompt with the prompt written under it, then the per-stage latency table of the
measured run (after a one-image warm-up that loads the graphs) and where the image is. The model is
the one shipped in the package, assembled in the cache on first use (``default_model``), or ``--bundle``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ntm_edge import validate
from ntm_edge.errors import exit_status
from ntm_edge.images import MIN_CELL, save_images

from .app import latency_table
from .default_model import default_bundle
from .precision import describe
from .sampler import RunResult, generate
from .session import open_runtime

PROMPTS = ("a handwritten seven", "the number 3", "zero")


def run_demo(prompts=PROMPTS, num: int = 8, out="demo.png", seed: int = 0, guidance: float = 0.0,
             threads: int | None = None, bundle=None, min_cell: int = MIN_CELL, log=print) -> RunResult:
    """``num`` images for each of ``prompts`` -> one labelled grid at ``out`` (a row per prompt)."""
    validate.count(num, "--num")
    validate.seed(seed)
    guidance = validate.guidance(guidance)
    out = validate.image_path(out)
    threads = validate.threads(threads)
    rt = open_runtime(bundle if bundle is not None else default_bundle(log=log), None, threads, "fp32")
    for prompt in prompts:
        rt.bundle.vocab.check(prompt)
    every = [p for p in prompts for _ in range(num)]  # row-major: row r holds prompts[r]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # the sampler checks finiteness itself
        generate(rt, list(prompts[:1]), seed=seed, guidance=guidance)  # warm-up: sessions load, not timed
        result = generate(rt, every, seed=seed, guidance=guidance)
    save_images(result.images, out, log=log, ncols=num, labels=list(prompts), min_cell=min_cell)
    log(f"providers: {', '.join(rt.providers)}; bundle {rt.bundle.root}")
    log(latency_table(result.timer, len(every), describe(rt.bundle, rt.precision)))
    log(f"wrote {Path(out).resolve()} ({len(prompts)} prompts x {num} images, {rt.bundle.config.steps} steps, "
        f"exit {result.final})")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ntm_edge.runtime.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo.png"), help="image grid to write")
    parser.add_argument("--num", type=int, default=8, help="images per prompt (one row each)")
    parser.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per graph (default: $OMP_NUM_THREADS)")
    parser.add_argument("--bundle", type=Path, default=None, help="a bundle instead of the default model")
    parser.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; default: three)")
    args = parser.parse_args(argv)
    return exit_status(lambda: run_demo(tuple(args.prompt or PROMPTS), num=args.num, out=args.out, seed=args.seed,
                                        guidance=args.guidance, threads=args.threads, bundle=args.bundle,
                                        log=lambda m: print(m, flush=True)))


if __name__ == "__main__":
    sys.exit(main())
