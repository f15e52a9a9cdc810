"""`ntm-edge train` and `train-denoiser` under torchrun: 2 CPU processes (gloo), `tiny` on a few digits.

A run depends on its global batch (--batch-size x ranks x --grad-accum) and seed, not on how many
processes share it (distributed.py), so 2 ranks x 1 micro-batch must equal 1 process x 2 micro-batches.
Tolerance: 1e-6 absolute on every weight. Measured: DDP 0 (bit for bit: the two-rank average of
gradients and the accumulated half-gradients round alike), FSDP2 about 2e-8 (sharded reductions
add in another order). Each torchrun start costs a few seconds, so the tests share their runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ntm_edge.checkpoint import load_train_state
from ntm_edge.data import load_dataset
from ntm_edge.denoiser import train_denoiser
from ntm_edge.train import Objective, TrainArgs, train

TOL = 1e-6
STEPS, BATCH, EVERY = 4, 4, 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NTM_EDGE_DIST_TIMEOUT": "60"}


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ntm_edge",
           *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One reference run (1 process, 2 micro-batches) and the same run on 2 ranks with DDP and FSDP2."""
    root = tmp_path_factory.mktemp("dist")
    digits = load_dataset("digits", "train")
    np.savez(root / "d.npz", images=digits.images[:96], labels=digits.labels[:96],
             class_names=np.array(digits.class_names))
    dataset = f"npz:{root / 'd.npz'}"
    common = dict(dataset=dataset, preset="tiny", batch_size=BATCH, checkpoint_every=EVERY, eval_images=0, seed=2)
    quiet = {"progress": False, "log": lambda *_: None}
    train(TrainArgs(steps=STEPS, grad_accum=2, out=str(root / "one"), **common), **quiet)
    shutil.copytree(root / "one", root / "one-at-4")
    train(TrainArgs(steps=STEPS + 2, grad_accum=2, out=str(root / "one"), **common), resume=True, **quiet)
    cli = ["train", "--dataset", dataset, "--preset", "tiny", "--batch-size", str(BATCH), "--checkpoint-every",
           str(EVERY), "--eval-images", "0", "--seed", "2", "--steps", str(STEPS)]
    results = {}
    for parallel in ("ddp", "fsdp"):
        results[parallel] = torchrun(*cli, "--out", str(root / parallel), "--parallel", parallel)
    return root, dataset, common, quiet, results


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_train_as_one_process_with_the_same_global_batch(runs, parallel):
    root, _, _, _, results = runs
    r = results[parallel]
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()  # rank 0 alone logs: one of each line
    assert sum(line.startswith("training tiny") for line in lines) == 1, r.stdout
    assert f"global batch {2 * BATCH} = {BATCH} x 2 ranks ({parallel.upper().replace('FSDP', 'FSDP2')})" in lines[0]
    a, b = load_train_state(root / "one-at-4"), load_train_state(root / parallel)
    assert a["step"] == b["step"] == STEPS
    for key in ("model", "ema"):
        assert max_diff(a[key], b[key]) <= TOL, (key, max_diff(a[key], b[key]))
    assert abs(a["loss_avg"] - b["loss_avg"]) <= 1e-6 * abs(a["loss_avg"])


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_an_error_every_rank_meets_exits_1_with_one_line(runs, parallel):
    """The status of a failed command survives the end of a gloo worker (os._exit, distributed.py):
    resuming a run that is already at --steps fails on both ranks after the model is wrapped."""
    root, dataset, _, _, results = runs
    assert results[parallel].returncode == 0
    step = load_train_state(root / parallel)["step"]
    r = torchrun("train", "--dataset", dataset, "--preset", "tiny", "--batch-size", str(BATCH), "--eval-images", "0",
                 "--seed", "2", "--steps", str(step), "--resume", "--parallel", parallel, "--out", str(root / parallel))
    assert r.returncode == 1, r.stdout + r.stderr
    ours = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert ours == [f"error: {root / parallel} is already at step {step}; pass a larger --steps to continue it"], r.stderr
    assert "terminate called" not in r.stderr


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_two_rank_checkpoint_resumes_in_one_process(runs, parallel):
    root, _, common, quiet, results = runs
    assert results[parallel].returncode == 0
    train(TrainArgs(steps=STEPS + 2, grad_accum=2, out=str(root / parallel), **common), resume=True, **quiet)
    a, b = load_train_state(root / "one"), load_train_state(root / parallel)
    assert a["step"] == b["step"] == STEPS + 2 and b["world_size"] == 1
    for key in ("model", "ema", "optimizer"):
        if key == "optimizer":
            a_, b_ = ({f"{i}.{n}": t for i, s in o["state"].items() for n, t in s.items()} for o in (a[key], b[key]))
        else:
            a_, b_ = a[key], b[key]
        assert max_diff(a_, b_) <= TOL, key


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_rank_that_dies_ends_the_run_with_one_line(runs, tmp_path, parallel):
    _, dataset, _, _, _ = runs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ntm_edge",
           "train", "--dataset", dataset, "--preset", "tiny", "--batch-size", "4", "--steps", "1000000",
           "--eval-images", "0", "--parallel", parallel, "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().startswith("training tiny")
        time.sleep(0.5)
        rank1 = _worker(proc.pid, rank=1)
        os.kill(rank1, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)  # no hang
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and ours[0].startswith("error: rank 0: lost contact with another rank ("), err
    assert ours[0].endswith("the run stops; continue it from the last checkpoint with --resume")


def _worker(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker process of ``rank`` (its environment says RANK=<rank>)."""
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError("no worker process of that rank")


def test_denoiser_on_two_ranks_as_one_process(runs):
    root, _, _, _, _ = runs
    for name in ("den-one", "den-two"):
        shutil.copytree(root / "one-at-4", root / name)
    train_denoiser(root / "den-one", steps=3, batch_size=4, trajectories=1, grad_accum=2, progress=False,
                   log=lambda *_: None)
    r = torchrun("train-denoiser", "--checkpoint", str(root / "den-two"), "--steps", "3", "--batch-size", "4",
                 "--trajectories", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sum(line.startswith("saved the denoiser") for line in r.stdout.splitlines()) == 1
    from safetensors.torch import load_file

    a, b = (load_file(root / name / "denoiser.safetensors") for name in ("den-one", "den-two"))
    assert max_diff(a, b) <= TOL


def test_bf16_autocast_keeps_the_likelihood_in_fp32():
    """Under bf16 autocast the network runs in bf16 while the NLL (an fp32 island) stays fp32 and
    close to the fp32 value."""
    from ntm_edge.config import get_preset
    from ntm_edge.losses import loss_function
    from ntm_edge.model import NTM

    torch.manual_seed(0)
    model = NTM(get_preset("tiny").with_data(1, tuple("0123456789")))
    objective = Objective(model, loss_function("ntm", "end2end"), None)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    ids = torch.randint(1, 11, (8, 1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    seen = []
    hook = model.predictor.backbone.stem.register_forward_hook(lambda m, i, o: seen.append(o.dtype))  # a conv
    try:
        fp32 = objective(x0, ids, mask, torch.Generator().manual_seed(1)).main
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = objective(x0, ids, mask, torch.Generator().manual_seed(1)).main
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.bfloat16]  # the network ran in bf16 under autocast
    assert bf16.dtype == torch.float32
    assert abs(bf16.item() - fp32.item()) <= 0.05 * abs(fp32.item())


def test_a_text_model_on_two_ranks_as_one_process(runs):
    """Text prompts (MiniLM captions) are drawn from each micro-batch's generator too: a text model and
    its denoiser train on 2 ranks as in one process with 2 micro-batches."""
    from safetensors.torch import load_file

    root, dataset, common, quiet, _ = runs
    text = {**common, "text_encoder": "minilm"}
    train(TrainArgs(steps=STEPS, grad_accum=2, out=str(root / "text-one"), **text), **quiet)
    r = torchrun("train", "--dataset", dataset, "--preset", "tiny", "--batch-size", str(BATCH), "--checkpoint-every",
                 str(EVERY), "--eval-images", "0", "--seed", "2", "--steps", str(STEPS), "--text-encoder", "minilm",
                 "--parallel", "ddp", "--out", str(root / "text-ddp"))
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = load_train_state(root / "text-one"), load_train_state(root / "text-ddp")
    assert a["config"]["prompt"]["kind"] == "minilm"
    for key in ("model", "ema"):
        assert max_diff(a[key], b[key]) <= TOL, key
    train_denoiser(root / "text-one", steps=3, batch_size=4, trajectories=1, grad_accum=2, progress=False,
                   log=lambda *_: None)
    r = torchrun("train-denoiser", "--checkpoint", str(root / "text-ddp"), "--steps", "3", "--batch-size", "4",
                 "--trajectories", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    den = [load_file(root / name / "denoiser.safetensors") for name in ("text-one", "text-ddp")]
    assert max_diff(*den) <= TOL
