"""Shared fixtures. One tiny model is trained once per session and reused (it costs ~20 s)."""

from __future__ import annotations

import pytest
import torch

TRAIN_STEPS = 300  # tiny on digits: enough to beat a uniform 8-bit model clearly (~6.6 bits/dim)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Every model in the suite is tiny: extra intra-op threads only spin-wait (up to 100x slower on
    a busy machine), so the whole suite runs torch on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """(checkpoint dir, training summary) of `tiny` trained on digits for TRAIN_STEPS steps."""
    from ntm_edge.train import TrainArgs, train

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    args = TrainArgs(dataset="digits", preset="tiny", steps=TRAIN_STEPS, batch_size=64, lr=2e-3, out=str(out),
                     checkpoint_every=100, eval_images=297, seed=0)
    summary = train(args, progress=False, log=lambda *_: None)
    return out, summary


TEXT_TRAIN_STEPS = 300  # tiny + MiniLM on digits captions: 150 steps still sits near chance, 300 follows paraphrases


@pytest.fixture(scope="session")
def trained_text_tiny(tmp_path_factory):
    """Checkpoint dir of `tiny` trained with --text-encoder minilm on digits captions, once per session."""
    from ntm_edge.train import TrainArgs, train

    out = tmp_path_factory.mktemp("ckpt") / "tiny_text"
    train(TrainArgs(dataset="digits", preset="tiny", steps=TEXT_TRAIN_STEPS, batch_size=64, lr=2e-3, out=str(out),
                    text_encoder="minilm", eval_images=0, seed=0), progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def text_bundle(trained_text_tiny, tmp_path_factory):
    """The export of ``trained_text_tiny`` (its prompt_encoder graph is the ~86 MB MiniLM): once per session."""
    from ntm_edge.export import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny_text"
    export_bundle(trained_text_tiny, out, batch=4, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def text_denoiser_ckpt(trained_text_tiny, tmp_path_factory):
    """A copy of ``trained_text_tiny`` with a denoiser trained for a few steps (its numbers are not the
    point: the tests compare the exported graph with the torch denoiser), once per session."""
    import shutil

    from ntm_edge.denoiser import train_denoiser

    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny_text_denoiser"
    shutil.copytree(trained_text_tiny, ckpt)
    train_denoiser(ckpt, steps=5, trajectories=1, batch_size=16, progress=False, log=lambda *_: None)
    return ckpt


@pytest.fixture(scope="session")
def text_denoiser_bundle(text_denoiser_ckpt, tmp_path_factory):
    """The export of ``text_denoiser_ckpt``: the MiniLM encoder graph and the denoiser graph that reads its output."""
    from ntm_edge.export import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny_text_denoiser"
    export_bundle(text_denoiser_ckpt, out, batch=4, log=lambda *_: None)
    return out
