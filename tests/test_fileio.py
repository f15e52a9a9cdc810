"""Atomic writes and the clean-up of temporaries that a killed process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ntm_edge.fileio import atomic_write, atomic_write_text, remove_stale_temporaries

# a child that starts an atomic write of DIR/out.bin and hangs inside it, until it is killed
_HANG = """
import sys, time
from pathlib import Path
from ntm_edge.fileio import atomic_write, make_temp_dir
d = Path(sys.argv[1])
make_temp_dir(d, "bundle")
def write(tmp):
    Path(tmp).write_bytes(b"partial")
    print("writing", flush=True)
    time.sleep(60)
atomic_write(d / "out.bin", write)
"""


def _start_hanging_writer(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HANG, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    return proc


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "good")

    def broken(tmp):
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    try:
        atomic_write(target, broken)
    except OSError:
        pass
    assert target.read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_leftovers_of_a_killed_writer_are_removed_and_a_live_writer_is_kept(tmp_path):
    (tmp_path / ".hidden.tmp").write_text("not ours")  # a dot-file that is not named as ours are
    (tmp_path / "user.12345.abc.tmp").write_text("not ours")
    live = _start_hanging_writer(tmp_path)
    dead = _start_hanging_writer(tmp_path)
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        names = lambda pid: sorted(p.name for p in tmp_path.iterdir() if f".{pid}." in p.name)  # noqa: E731
        leftovers = names(dead.pid)
        assert len(leftovers) == 2 and len(names(live.pid)) == 2  # out.bin's temporary + a bundle dir
        removed = remove_stale_temporaries(tmp_path)
        assert sorted(p.name for p in removed) == leftovers
        assert names(dead.pid) == []
        assert len(names(live.pid)) == 2  # a write in progress is never touched
        assert (tmp_path / ".hidden.tmp").exists() and (tmp_path / "user.12345.abc.tmp").exists()
        assert not (tmp_path / "out.bin").exists()
    finally:
        live.kill()
        live.wait()


def test_only_the_named_target_is_cleaned(tmp_path):
    proc = _start_hanging_writer(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name.split(".")[1] for p in remove_stale_temporaries(tmp_path, name="bundle")] == ["bundle"]
    assert [p.name.split(".")[1] for p in remove_stale_temporaries(tmp_path)] == ["out"]
    assert sorted(os.listdir(tmp_path)) == []
