"""Small torch-free file helpers shared by the training side and the runtime: atomic writes (of one
file, or of several as one save: ``StagedWrites``), sha256 hashing, sealed JSON records (``seal``),
and the check of an output directory before long work (``output_dir_problem``). numpy-free and
torch-free, so ``ntm_edge.runtime`` imports it without pulling in anything of the training side.

Atomic write: the content goes to a temporary file next to the target, named
``.<name>.<pid>.<random>.tmp`` (a dot-file, so it never passes for a real output), is fsync'ed, then
renamed over the target. An interrupted write leaves the old file (or none) under the real name,
never a half-written one. A process killed outright (SIGKILL, power loss) cannot remove its
temporary; the writer's pid in the name lets the next run in that directory tell such a leftover
(its process is gone) from a write in progress (``remove_stale_temporaries``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"
SEAL = "self_sha256"  # the field of a sealed JSON record that hashes its other fields (``seal``)
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


def stale_temporaries(directory: Path, name: str | None = None) -> list[tuple[Path, str, int]]:
    """(path, target name, writer pid) of each temporary in ``directory`` whose writer no longer runs.
    Only entries named exactly as ``atomic_write`` / ``make_temp_dir`` name them are considered (and
    only those for the target ``name``, when given)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        m = _TMP_NAME.match(entry.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and not _process_alive(pid):
            found.append((entry, m["name"], pid))
    return found


def remove_stale_temporaries(directory: Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries that ntm-edge left in ``directory`` from a process that no longer runs
    (killed mid-write); a temporary of a live process is kept. Returns what was removed. Call
    ``finish_interrupted_save`` first where a staged save may have been cut short."""
    removed = []
    for entry, _, _ in stale_temporaries(directory, name):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def finish_interrupted_save(directory: Path, record: str, hashed: dict[str, str]) -> bool:
    """Complete a ``StagedWrites`` save whose writer was killed while renaming its files into place.

    Such a save has every file written and fsync'ed, some renamed and the rest, the commit record
    ``record`` among them (staged last), still under a dead process's temporary names. ``record`` is
    a sealed JSON holding the sha256 of each other file under ``hashed[file name]``. When a dead
    writer left a sealed record whose every listed file is in place or among its temporaries with
    that hash, the remaining renames are done, and True returned. Anything less (a save cut short
    while still writing) is left for ``remove_stale_temporaries``: the previous files stand."""
    stale = stale_temporaries(directory)
    directory = Path(directory)
    for entry, target, pid in stale:
        if target != record:
            continue
        try:
            meta = json.loads(entry.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict) or not is_sealed(meta):
            continue
        moves = []
        for name, key in hashed.items():
            if key not in meta:
                continue
            temps = [e for e, t, p in stale if t == name and p == pid]
            source = temps[0] if len(temps) == 1 else directory / name
            if not source.is_file() or sha256_file(source) != meta[key]:
                break
            if temps:
                moves.append((source, directory / name))
        else:
            for source, target_path in [*moves, (entry, directory / record)]:
                os.replace(source, target_path)
            return True
    return False


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it into place."""
    with StagedWrites() as staged:
        staged.write(path, write)


class StagedWrites:
    """Files replaced together, as one save (a checkpoint: train state, weights, config and the
    metadata that hashes them).

    ``write`` puts each file's content in its temporary (fsync'ed) and changes nothing under a real
    name, so a failure while any content is written (ENOSPC, EFBIG, an exception) leaves the previous
    files exactly as they were: the temporaries are removed and the error propagates. Leaving the
    ``with`` block without an error renames them all into place, in the order written; write the file
    that commits the others (the one holding their hashes) last. A writer killed during those renames
    leaves a complete save behind, which ``finish_interrupted_save`` puts in place.
    """

    def __init__(self):
        self._staged: list[tuple[Path, Path]] = []  # (temporary, target)

    def write(self, path: Path, write) -> Path:
        """Stage ``path``: call ``write(tmp_path)``; returns the temporary (to hash it, say)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=TMP_SUFFIX)
        os.close(fd)
        tmp = Path(name)
        self._staged.append((tmp, path))
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp (and some writers) make 0600; give what open() would
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        return tmp

    def __enter__(self) -> StagedWrites:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                for tmp, path in self._staged:
                    os.replace(tmp, path)
        finally:
            for tmp, _ in self._staged:
                tmp.unlink(missing_ok=True)  # every temporary of a failed save; none after a commit


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def nearest_existing(path: Path) -> Path:
    """``path`` itself, or its closest ancestor that exists (where ``path`` would be created)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def output_dir_problem(directory: Path, need_bytes: int = 0) -> str | None:
    """Why files cannot be written into ``directory`` (None: they can): it is a file, lies under a
    file, is not writable (checked by creating and removing a temporary, which also catches read-only
    file systems and a root user's unusual permissions), or its file system has less than
    ``need_bytes`` free. Nothing is left behind. Meant to run before long work that ends in a save."""
    directory = Path(directory)
    link = directory.absolute()
    while not link.exists() and link != link.parent:  # a dangling link on the way cannot become a directory
        if link.is_symlink():
            return f"{link} is a broken symbolic link"
        link = link.parent
    if directory.exists() and not directory.is_dir():
        return f"{directory} exists and is not a directory"
    base = nearest_existing(directory)
    if not base.is_dir():
        return f"{directory} cannot be created: {base} is a file, not a directory"
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=temp_prefix("probe"), suffix=TMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{directory} is not writable: cannot write in {base} ({e.strerror or e})"
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        return (f"{directory} needs about {_mb(need_bytes)} free for a checkpoint; its file system has "
                f"{_mb(free)} left")
    return None


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def seal(record: dict) -> dict:
    """``record`` with ``self_sha256``: the sha256 of its other fields (canonical JSON), so that
    an edited or damaged metadata file is told from a good one (``is_sealed``)."""
    return {**record, SEAL: _digest(record)}


def is_sealed(record: dict) -> bool:
    """True when ``record`` (parsed JSON) carries a ``self_sha256`` that matches its other fields."""
    rest = {k: v for k, v in record.items() if k != SEAL}
    return isinstance(record.get(SEAL), str) and record[SEAL] == _digest(rest)


def _digest(record: dict) -> str:
    return canonical_sha256(record)


def canonical_sha256(record: dict) -> str:
    """sha256 of ``record`` as canonical JSON (sorted keys, no spaces): the content hash of a metadata file."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; ValueError with the reason when it is not valid JSON or not an object
    (the caller turns it into its own one-line error)."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{e.__class__.__name__}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


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
