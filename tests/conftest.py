"""Shared fixtures. One tiny model is trained once per session and reused (it costs ~20 s)."""

from __future__ import annotations

import pytest

TRAIN_STEPS = 300  # tiny on digits: enough to beat a uniform 8-bit model clearly (~6.6 bits/dim)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """(checkpoint dir, training summary) of `tiny` trained on digits for TRAIN_STEPS steps."""
    from ntm_edge.train import TrainArgs, train

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    args = TrainArgs(dataset="digits", preset="tiny", steps=TRAIN_STEPS, batch_size=64, lr=2e-3, out=str(out),
                     checkpoint_every=100, eval_images=297, seed=0)
    summary = train(args, progress=False, log=lambda *_: None)
    return out, summary
