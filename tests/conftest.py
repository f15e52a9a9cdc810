"""Shared fixtures, and how the suite spreads over CPU cores.

``make test`` runs the suite on two pytest-xdist workers with ``--dist loadfile``: each module's tests
run on one worker, so a module-scoped fixture is built once. The session's trained models and bundles
(a tiny model, ~100 s on one core; a tiny MiniLM model and its bundles, more) are built once per run
for both workers (``built_once``): the first worker to need one builds it, the other waits and reuses it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

# tiny on digits, pairwise on the 4-step grid (``--mode pairwise --pairwise-steps 4``): measured on one core
# against the preset's end-to-end training, 450 pairwise steps took 76 CPU s against 162 s for 300 end-to-end
# steps and came out better (held-out 6.41 against 6.51 bits/dim; prompt accuracy at guidance 2, 100 samples,
# 0.62 against 0.32; Frechet 12.5 against 17.1), as the transporter study found at larger budgets
TRAIN_STEPS = 450
TRAIN_MODE: dict[str, Any] = {"mode": "pairwise", "pairwise_steps": (4,)}  # a resume of trained_tiny passes these too


def run_root(tmp_path_factory) -> Path:
    """The run's temporary root, the same for every worker (under pytest-xdist each worker has its own
    basetemp inside it)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The directory ``name``, made by ``build(path)`` once per test run, also under pytest-xdist: the first
    worker to ask builds it (in the run's shared temporary root, under a file lock) and marks it done; the
    others wait for it and reuse it. Used for the session's trained models, which no test writes to."""
    import shutil

    from filelock import FileLock

    root = run_root(tmp_path_factory)
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # what a failed build left (ours, in pytest's temporary root)
            build(path)
            done.touch()
    return path


# Under pytest-xdist, worker -> the shared builds it makes before its first test, in order: the two most
# shared models start at once on the two cores, instead of both workers first meeting the same one (the
# second would wait for it idle); the text model's worker then also builds the exported tiny bundle of
# tests/test_export.py (``make_tiny_bundle``, which seven modules share: the first two of them to need it at
# once left a worker waiting for it, ~40 s)
WARM_UP = {"gw0": ["trained_tiny"], "gw1": ["trained_text_tiny", "make_tiny_bundle"]}


@pytest.fixture(autouse=True, scope="session")
def _run_cache(tmp_path_factory):
    """$NTM_EDGE_CACHE for the whole run (subprocesses inherit it): one directory in the run's temporary root,
    shared by the workers, so that no test reads or writes the user's ~/.cache/ntm-edge and what one test
    caches (the eval classifier, prompt embeddings, calibration) serves the others. Tests that check a cache's
    behaviour set their own."""
    root = run_root(tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NTM_EDGE_CACHE", str(root / "ntm_edge_cache"))
        yield root / "ntm_edge_cache"


@pytest.fixture(autouse=True, scope="session")
def _warm_up(request, tmp_path_factory, _one_thread, _run_cache):
    items = request.session.items
    for name in WARM_UP.get(os.environ.get("PYTEST_XDIST_WORKER", ""), []):
        if name == "make_tiny_bundle":
            build = next((getattr(i.module, name) for i in items if hasattr(getattr(i, "module", None), name)), None)
            if build is not None:
                build(tmp_path_factory)
        elif any(name in getattr(item, "fixturenames", ()) for item in items):
            request.getfixturevalue(name)


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
    """(checkpoint dir, training summary) of `tiny` trained on digits for TRAIN_STEPS pairwise steps of the
    4-step grid."""
    from ntm_edge.train import TrainArgs, train

    def build(root: Path) -> None:
        args = TrainArgs(dataset="digits", preset="tiny", steps=TRAIN_STEPS, **TRAIN_MODE, batch_size=64, lr=2e-3,
                         out=str(root / "tiny"), checkpoint_every=100, eval_images=297, seed=0)
        summary = train(args, progress=False, log=lambda *_: None)
        (root / "summary.json").write_text(json.dumps(summary))

    root = built_once(tmp_path_factory, "trained_tiny", build)
    return root / "tiny", json.loads((root / "summary.json").read_text())


# tiny + MiniLM on digits captions, pairwise on the 4-step grid like trained_tiny: 450 steps follow held-out
# paraphrases as well as 300 end-to-end steps did, at about half the CPU seconds (tests/test_text_prompts.py)
TEXT_TRAIN_STEPS = 450


@pytest.fixture(scope="session")
def trained_text_tiny(tmp_path_factory):
    """Checkpoint dir of `tiny` trained with --text-encoder minilm on digits captions, once per run."""
    from ntm_edge.train import TrainArgs, train

    def build(root: Path) -> None:
        train(TrainArgs(dataset="digits", preset="tiny", steps=TEXT_TRAIN_STEPS, **TRAIN_MODE, batch_size=64, lr=2e-3,
                        out=str(root / "tiny_text"), text_encoder="minilm", eval_images=0, seed=0),
              progress=False, log=lambda *_: None)

    return built_once(tmp_path_factory, "trained_text_tiny", build) / "tiny_text"


def _export(tmp_path_factory, name: str, ckpt: Path) -> Path:
    """The export of checkpoint ``ckpt`` (batch 4), once per run, as ``name``."""
    from ntm_edge.export import export_bundle

    build = lambda root: export_bundle(ckpt, root / "bundle", batch=4, log=lambda *_: None)  # noqa: E731
    return built_once(tmp_path_factory, name, build) / "bundle"


@pytest.fixture(scope="session")
def text_bundle(trained_text_tiny, tmp_path_factory):
    """The export of ``trained_text_tiny`` (its prompt_encoder graph is the ~86 MB MiniLM): once per run."""
    return _export(tmp_path_factory, "text_bundle", trained_text_tiny)


@pytest.fixture(scope="session")
def text_denoiser_ckpt(trained_text_tiny, tmp_path_factory):
    """A copy of ``trained_text_tiny`` with a denoiser trained for a few steps (its numbers are not the
    point: the tests compare the exported graph with the torch denoiser), once per run."""
    import shutil

    from ntm_edge.denoiser import train_denoiser

    def build(root: Path) -> None:
        shutil.copytree(trained_text_tiny, root / "ckpt")
        train_denoiser(root / "ckpt", steps=5, trajectories=1, batch_size=16, progress=False, log=lambda *_: None)

    return built_once(tmp_path_factory, "text_denoiser_ckpt", build) / "ckpt"


# the precision passes of the text bundle with a denoiser: small calibration and quality-gate sets (the
# gate's verdict on a 450-step tiny model is a coin toss: --force keeps every precision, the tests check figures)
TEXT_PRECISION_EXPORT = ["--fp16", "--int8", "--calib-images", "32", "--calib-samples", "8", "--quality-samples", "40",
                         "--force"]


@pytest.fixture(scope="session")
def text_denoiser_bundle(text_denoiser_ckpt, tmp_path_factory):
    """(bundle, CLI output) of `ntm-edge export --fp16 --int8` of ``text_denoiser_ckpt``, once per run: the MiniLM
    encoder graph, the denoiser graph that reads its output, each graph in fp32 (what a runtime opens by
    default), fp16 and int8. Its own cache directory (calibration, prompts, the eval classifier). Checks that
    the export left the shared checkpoint untouched."""
    from typer.testing import CliRunner

    from ntm_edge.cli import app

    def build(root: Path) -> None:
        before = {p.name: p.read_bytes() for p in text_denoiser_ckpt.iterdir() if p.is_file()}
        r = CliRunner().invoke(app, ["export", "--checkpoint", str(text_denoiser_ckpt), "--out", str(root / "bundle"),
                                     "--batch", "4", *TEXT_PRECISION_EXPORT], env={"NTM_EDGE_CACHE": str(root / "cache")})
        assert r.exit_code == 0, r.output
        assert {p.name: p.read_bytes() for p in text_denoiser_ckpt.iterdir() if p.is_file()} == before
        (root / "export.log").write_text(r.output)

    root = built_once(tmp_path_factory, "text_denoiser_bundle", build)
    return root / "bundle", (root / "export.log").read_text()
