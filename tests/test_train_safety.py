"""Nothing lost: the output directory is checked before step 1, a save that fails keeps the last
good checkpoint and stops with one line, and signals stop `train-denoiser` cleanly.

Full and read-only file systems are real: small tmpfs mounts (skipped where this process may not
mount) and, everywhere, a file-size limit (RLIMIT_FSIZE) on a training subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ntm_edge import NTM
from ntm_edge.checkpoint import load_train_state
from ntm_edge.data import load_dataset
from ntm_edge.errors import NtmError
from ntm_edge.train import TrainArgs, checkpoint_bytes, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def quiet(**kw):
    return {"progress": False, "log": lambda *_: None, **kw}


def tiny_args(out: Path, **kw) -> TrainArgs:
    return TrainArgs(**{"dataset": "digits", "preset": "tiny", "steps": 3, "batch_size": 4, "eval_images": 0,
                        "out": str(out), **kw})


def _mount(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size under tmp_path; unmounted afterwards."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        path = tmp_path / f"fs{len(mounted)}"
        if not _mount(path, f"size={size}" + (",ro" if read_only else "")):
            pytest.skip("this process may not mount a tmpfs (needs root or CAP_SYS_ADMIN)")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> None:
    """Write zeros into ``directory`` until its file system is full."""
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
        try:
            f.close()
        except OSError:
            pass


# -- before step 1 -------------------------------------------------------------------------------

def test_out_that_is_a_file_is_refused_before_any_work(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(NtmError, match="exists and is not a directory"):
        train(tiny_args(target), **quiet())
    with pytest.raises(NtmError, match="cannot be created: .* is a file"):
        train(tiny_args(target / "run"), **quiet())
    assert target.read_text() == "mine"


def test_unwritable_out_is_refused_before_any_work(tmp_path, tmpfs):
    if os.geteuid() != 0:  # permissions are enough without root; root writes anywhere but on a read-only fs
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
    else:
        locked = tmpfs("1m", read_only=True)
    with pytest.raises(NtmError, match="is not writable"):
        train(tiny_args(locked / "run"), **quiet())
    assert list(locked.iterdir()) == []


def test_too_little_free_space_is_refused_before_step_1(tmpfs):
    small = tmpfs("2m")
    out = small / "run"
    with pytest.raises(NtmError, match=r"needs about \d+\.\d MB free for a checkpoint; its file system has \d+\.\d MB"):
        train(tiny_args(out, steps=50), **quiet())
    assert not out.exists() or list(out.iterdir()) == []


def test_checkpoint_size_estimate_covers_a_real_checkpoint(trained_tiny):
    ckpt, _ = trained_tiny
    written = sum(p.stat().st_size for p in ckpt.iterdir())
    assert written <= checkpoint_bytes(NTM.from_pretrained(ckpt)) <= 1.5 * written


# -- at a save -----------------------------------------------------------------------------------

def test_full_disk_at_a_save_keeps_the_last_checkpoint_and_stops_with_one_line(tmpfs):
    disk = tmpfs("24m")
    out = disk / "run"

    def log(line: str) -> None:  # at step 4 (after the save of step 3) another program fills the disk
        if line.startswith("step 4/"):
            fill(disk)

    with pytest.raises(NtmError) as err:
        train(tiny_args(out, steps=50, checkpoint_every=3), progress=False, log=log, log_every=4)
    message = str(err.value)
    assert "\n" not in message
    assert message == f"cannot save step 6 to {out}: No space left on device; the checkpoint of step 3 is kept"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.json", "config.json", "model.safetensors",
                                                     "train_state.pt"]  # no temporary left behind
    assert load_train_state(out)["step"] == 3  # verified against checkpoint.json's hashes
    NTM.from_pretrained(out)
    (disk / "filler").unlink()  # room again: the run continues from step 3
    summary = train(tiny_args(out, steps=8, checkpoint_every=3), resume=True, **quiet())
    assert summary["step"] == 8


_LIMITED_TRAIN = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from ntm_edge.cli import main
sys.argv = ["ntm-edge", *sys.argv[2:]]
main()
"""


def test_a_write_the_os_refuses_is_one_line_and_no_partial_file(tmp_path):
    """RLIMIT_FSIZE makes every write past 1 MB fail (EFBIG) in a real `ntm-edge train` process: the first
    save fails with one line and exit 1, and nothing is left in the output directory."""
    out = tmp_path / "run"
    digits = load_dataset("digits", "train")  # a few digits as an .npz: the process starts without scikit-learn
    np.savez(tmp_path / "d.npz", images=digits.images[:64], labels=digits.labels[:64],
             class_names=np.array(digits.class_names))
    cmd = [sys.executable, "-c", _LIMITED_TRAIN, str(1 << 20), "train", "--dataset", f"npz:{tmp_path / 'd.npz'}",
           "--preset", "tiny",
           "--steps", "2", "--batch-size", "4", "--eval-images", "0", "--out", str(out)]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.strip() == f"error: cannot save step 2 to {out}: File too large; nothing was saved", r.stderr
    assert list(out.iterdir()) == []


def test_sigterm_stops_the_denoiser_cleanly(trained_tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_tiny[0], ckpt)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    proc = subprocess.Popen([sys.executable, "-m", "ntm_edge", "train-denoiser", "--checkpoint", str(ckpt),
                             "--steps", "100000", "--trajectories", "1"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("building")  # signals are handled from here on
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err)
    assert "interrupted by SIGTERM: the denoiser was not saved" in out and err == ""
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # nothing added, nothing changed


_KILLED_DURING_RENAMES = """
import os, signal, sys
from ntm_edge import NTM
from ntm_edge.checkpoint import load_info, load_train_state, save_training_checkpoint
ckpt, renames = sys.argv[1], int(sys.argv[2])
state, info = load_train_state(ckpt), load_info(ckpt)
state["step"] += 1
replace, done = os.replace, []
def replace_then_die(src, dst):  # the process is killed (for real) after `renames` renames
    if len(done) == renames:
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)
    done.append(dst)
os.replace = replace_then_die
save_training_checkpoint(NTM.from_pretrained(ckpt), ckpt, state, {k: info[k] for k in ("dataset", "preset", "objective")})
"""


@pytest.mark.parametrize("renames", [0, 1, 2, 3])
def test_a_save_killed_between_its_renames_is_completed_on_the_next_load(trained_tiny, tmp_path, renames):
    """SIGKILL after all files of a save are written but before all are renamed into place: the next
    load finishes the renames (the save was complete), rather than finding mismatched hashes."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_tiny[0], ckpt)
    step = load_train_state(ckpt)["step"]
    r = subprocess.run([sys.executable, "-c", _KILLED_DURING_RENAMES, str(ckpt), str(renames)], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert len([p for p in ckpt.iterdir() if p.name.endswith(".tmp")]) == 4 - renames  # what the kill left
    assert load_train_state(ckpt)["step"] == step + 1  # completed and verified
    NTM.from_pretrained(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint.json", "config.json", "model.safetensors",
                                                      "train_state.pt"]
