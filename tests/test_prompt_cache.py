"""The runtime's on-disk prompt-embedding cache (torch-free)."""

from __future__ import annotations

import numpy as np

from ntm_edge.runtime.prompt_cache import PromptCache


def test_hit_miss_and_keys(tmp_path):
    ids = np.array([101, 2698, 102, 0], dtype=np.int64)
    emb = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    cache = PromptCache("a" * 64, tmp_path)
    assert cache.get(ids, emb.shape) is None and cache.misses == 1
    cache.put(ids, emb)
    assert np.array_equal(cache.get(ids, emb.shape), emb) and cache.hits == 1
    assert PromptCache("b" * 64, tmp_path).get(ids, emb.shape) is None  # another encoder never hits
    assert cache.get(np.array([101, 2093, 102, 0]), emb.shape) is None  # another prompt
    assert cache.get(ids, (4, 9)) is None  # a shape the model does not read is a miss


def test_corrupt_entry_is_a_miss_and_is_rewritten(tmp_path):
    ids = np.array([101, 102], dtype=np.int64)
    emb = np.ones((2, 3), dtype=np.float32)
    cache = PromptCache("c" * 64, tmp_path)
    cache.put(ids, emb)
    (entry,) = tmp_path.glob("*.npy")
    entry.write_bytes(entry.read_bytes()[:20])  # truncated
    assert cache.get(ids, emb.shape) is None
    cache.put(ids, emb)
    assert np.array_equal(cache.get(ids, emb.shape), emb)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npy"]  # no temporary left
