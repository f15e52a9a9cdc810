"""Kill tests: a real `ntm-edge train` process is stopped at random points by SIGKILL, SIGTERM and
a double Ctrl-C (SIGINT twice), resumed each time, and must end with the weights of an uninterrupted
run, bit for bit, and no temporary file. After SIGKILL the run resumes from its last periodic
checkpoint; after SIGINT / SIGTERM from the checkpoint it saved on the way out (exit 130 / 143)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ntm_edge.checkpoint import load_train_state
from ntm_edge.data import load_dataset
from ntm_edge.train import TrainArgs, train

STEPS, EVERY, BATCH, SEED = 60, 4, 16, 5  # batch 16: ~0.1 s a step, so no run outpaces the signals
# the order of the interruptions; a tuple is sent as fast as possible (a second Ctrl-C)
SIGNALS = (signal.SIGKILL, signal.SIGTERM, (signal.SIGINT, signal.SIGINT), signal.SIGKILL)
EXPECTED_CODE = {signal.SIGKILL: -signal.SIGKILL, signal.SIGINT: 130, signal.SIGTERM: 143}
FILES = {"config.json", "model.safetensors", "checkpoint.json", "train_state.pt"}


def _command(dataset: str, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "ntm_edge", "train", "--dataset", dataset, "--preset", "tiny",
            "--steps", str(STEPS), "--batch-size", str(BATCH), "--checkpoint-every", str(EVERY),
            "--seed", str(SEED), "--eval-images", "0", "--out", str(out)] + (["--resume"] if resume else [])


def _saved_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 120.0) -> float:
    """Until the checkpoint of ``step`` (or later) is on disk, or the process has ended -> the time then."""
    end = time.monotonic() + timeout
    while _saved_step(out) < step and proc.poll() is None:
        assert time.monotonic() < end, "the training process made no progress"
        time.sleep(0.005)
    return time.monotonic()


def _default_signals() -> None:
    """In the child, before exec: SIGINT and SIGTERM at their defaults. A job started in the background
    by a non-interactive shell (a CI runner's `cmd &`) inherits SIGINT ignored, and `ntm-edge train`
    leaves an ignored signal ignored on purpose (as nohup'd programs should), so Ctrl-C would not reach
    it: the test's double SIGINT then did nothing and the run ended on its own."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _temporaries(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.endswith(".tmp")] if out.exists() else []


def test_interrupted_runs_resume_bit_for_bit(tmp_path):
    # digits as an .npz: the same images, and each training process starts without importing scikit-learn
    digits = load_dataset("digits", "train")
    np.savez(tmp_path / "digits.npz", images=digits.images, labels=digits.labels, test_images=digits.images[:1],
             test_labels=digits.labels[:1], class_names=np.array(digits.class_names))
    dataset = f"npz:{tmp_path / 'digits.npz'}"
    reference = tmp_path / "reference"
    train(TrainArgs(dataset=dataset, preset="tiny", steps=STEPS, batch_size=BATCH, checkpoint_every=EVERY,
                    seed=SEED, eval_images=0, out=str(reference)), progress=False, log=lambda *_: None)

    out, rng = tmp_path / "interrupted", random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    interruptions, log = 0, []
    for sent in [*SIGNALS, None]:
        start_step = _saved_step(out)
        proc = subprocess.Popen(_command(dataset, out, resume=(out / "checkpoint.json").exists()), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=_default_signals)
        if sent is not None:
            # a random point: a random part of the interval after the second periodic save, the interval's
            # length measured on the first one (a fixed delay would span many intervals on a fast machine,
            # and the run could end before the last signal)
            first_save = _wait_for_step(proc, out, start_step + EVERY)
            interval = _wait_for_step(proc, out, start_step + 2 * EVERY) - first_save
            time.sleep(rng.uniform(0.0, 1.0) * interval)
            for sig in sent if isinstance(sent, tuple) else (sent,):
                if proc.poll() is None:
                    proc.send_signal(sig)
        output, _ = proc.communicate(timeout=300)
        log.append((sent, proc.returncode, start_step, _saved_step(out), output[-500:]))
        first = sent[0] if isinstance(sent, tuple) else sent
        if proc.returncode == 0:
            break  # the run reached the end before the signal: fewer interruptions than planned
        assert proc.returncode == EXPECTED_CODE[first], log[-1]
        interruptions += 1
        if first != signal.SIGKILL:
            assert _temporaries(out) == [], log[-1]  # a clean stop leaves no temporary
            last = output.strip().splitlines()[-1]
            if isinstance(sent, tuple):  # the second signal stops at once, or waits for a save in progress
                assert "without saving" in last or "checkpoint saved" in last, output
            else:
                assert last == (f"interrupted by {first.name} at step {_saved_step(out)}; checkpoint saved to {out}; "
                                "continue with --resume"), output
    if proc.returncode != 0:  # the last planned interruption hit: run to the end
        proc = subprocess.run(_command(dataset, out, resume=True), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (log, proc.stdout, proc.stderr)
    assert interruptions >= 3, [entry[:4] + (entry[4].strip().splitlines()[-1:],) for entry in log]

    assert {p.name for p in out.iterdir()} == FILES  # no temporary left, not even a killed process's
    a, b = load_train_state(reference), load_train_state(out)
    assert a["step"] == b["step"] == STEPS
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs from the uninterrupted run ({log})"
    assert (reference / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert a["loss_avg"] == b["loss_avg"]
