"""Small torch-free file helpers shared by the training side and the runtime: atomic writes and
sha256 hashing. numpy-free and torch-free, so ``ntm_edge.runtime`` imports it without pulling in
anything of the training side.

Atomic write: the content goes to a temporary file next to the target, named
``.<name>.<pid>.<random>.tmp`` (a dot-file, so it never passes for a real output), is fsync'ed, then
renamed over the target. An interrupted write leaves the old file (or none) under the real name,
never a half-written one. A process killed outright (SIGKILL, power loss) cannot remove its
temporary; the writer's pid in the name lets the next run in that directory tell such a leftover
(its process is gone) from a write in progress (``remove_stale_temporaries``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"
# .<name>.<pid>.<random>.tmp, as tempfile.mkstemp / mkdtemp name them with our prefix and suffix
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def temp_prefix(name: str) -> str:
    """The prefix of this process's temporaries for the target ``name``: ``.<name>.<pid>.``."""
    return f".{name}.{os.getpid()}."


def make_temp_dir(parent: Path, name: str) -> Path:
    """An empty directory next to the target ``parent/name``, for work that is renamed into place."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=temp_prefix(name), suffix=TMP_SUFFIX))
    tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes it private; the result is an ordinary directory
    return tmp


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(directory: Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries that ntm-edge left in ``directory`` from a process that no longer runs
    (killed mid-write). Only entries named exactly as ``atomic_write`` / ``make_temp_dir`` name them
    are considered (and only those for the target ``name``, when given); a temporary of a live
    process is kept. Returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        m = _TMP_NAME.match(entry.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _process_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=TMP_SUFFIX)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def publish_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory ``tmp`` to ``out`` by renames; an existing ``out`` (which the caller
    has checked is one of its own kind) is moved aside first and removed only once ``tmp`` is in place."""
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = make_temp_dir(out.parent, out.name)
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
