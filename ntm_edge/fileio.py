"""Small torch-free file helpers shared by the training side and the runtime: atomic writes and
sha256 hashing. numpy-free and torch-free, so ``ntm_edge.runtime`` imports it without pulling in
anything of the training side.

Atomic write: the content goes to a temporary file next to the target, named ``.<name>.<random>.tmp``
(a dot-file, so it never passes for a real output), is fsync'ed, then renamed over the target.
An interrupted write leaves the old file (or none) under the real name, never a half-written one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
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
