"""An on-disk cache of prompt embeddings for the runtime, so that a repeated prompt costs nothing.

The key is the sha256 of (the text encoder's weights hash, the token count, the token ids): the
same prompt under another encoder or tokenisation never hits. Entries are single .npy files written
atomically under ``$NTM_EDGE_CACHE/prompts/`` (default ``~/.cache/ntm-edge/prompts``); a corrupt or
mis-shaped entry is treated as a miss and rewritten. numpy only.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..fileio import atomic_write


def cache_root() -> Path:
    return Path(os.environ.get("NTM_EDGE_CACHE", Path.home() / ".cache" / "ntm-edge"))


class PromptCache:
    def __init__(self, encoder_sha256: str, root: Path | None = None):
        self.encoder_sha256 = encoder_sha256
        self.dir = Path(root) if root is not None else cache_root() / "prompts"
        self.hits = self.misses = 0

    def _path(self, ids_row: np.ndarray) -> Path:
        row = np.ascontiguousarray(ids_row, dtype=np.int64)
        key = hashlib.sha256(self.encoder_sha256.encode() + row.shape[0].to_bytes(4, "little") + row.tobytes())
        return self.dir / f"{key.hexdigest()}.npy"

    def get(self, ids_row: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
        """The cached embedding (P, E) of one prompt's ids (P,), or None."""
        path = self._path(ids_row)
        try:
            value = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            self.misses += 1
            return None
        if value.shape != tuple(shape) or value.dtype != np.float32 or not np.isfinite(value).all():
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, ids_row: np.ndarray, value: np.ndarray) -> None:
        def write(tmp):
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(value, dtype=np.float32))

        try:
            atomic_write(self._path(ids_row), write)
        except OSError:
            pass  # a read-only or full cache directory only costs speed
