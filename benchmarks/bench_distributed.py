"""Training throughput under torchrun on CPU: 1 and 2 processes (gloo, one thread each), side by side.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/bench_distributed.py -q

Trains `small` on mnist5k with the same per-rank batch at 1 and 2 ranks (so the global batch doubles)
and times steps 50..100 from the run's own history (startup, data loading and the first steps are
left out). Prints images/s per rank and in all, and the scaling efficiency: images/s with 2 ranks
over twice the images/s of 1. On a machine with fewer free cores than ranks the ranks share cores
and the efficiency says so.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ntm_edge.checkpoint import load_train_state

PRESET, DATASET, BATCH, STEPS = "small", "mnist5k", 32, 100
_RATES: dict[int, float] = {}  # world size -> images/s per rank, filled by the two runs in order


def run(world: int, out) -> float:
    """Images/s per rank over steps 50..100 of a `world`-rank run."""
    train = ["-m", "ntm_edge", "train", "--preset", PRESET, "--dataset", DATASET, "--batch-size", str(BATCH),
             "--steps", str(STEPS), "--checkpoint-every", "100000", "--eval-images", "0", "--out", str(out)]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)] if world > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run([sys.executable, *launcher, *train], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr
    history = {h["step"]: h["seconds"] for h in load_train_state(out)["history"]}
    return BATCH * 50 / (history[100] - history[50])


@pytest.mark.parametrize("world", [1, 2])
def test_throughput(world, tmp_path, summary):
    per_rank = run(world, tmp_path / f"w{world}")
    rates = _RATES
    rates[world] = per_rank
    summary.append(f"train {PRESET} batch {BATCH}/rank, {world} rank(s): {per_rank:.1f} images/s per rank, "
                   f"{per_rank * world:.1f} images/s in all, cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    if len(rates) == 2:
        summary.append(f"scaling efficiency 2 ranks / 1: {rates[2] * 2 / (2 * rates[1]):.2f} "
                       f"(images/s {rates[2] * 2:.1f} vs {rates[1]:.1f})")

