"""Baselines on the same backbone (Gaussian, flow matching) and finetuning an NTM from flow matching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ntm_edge import NTM
from ntm_edge.config import get_preset
from ntm_edge.errors import ConfigError
from ntm_edge.exits import sample_images
from ntm_edge.losses import pairwise_loss
from ntm_edge.train import TrainArgs, _init_from_fm, finetune_config, train

CLASSES = tuple(str(i) for i in range(10))


def quiet(**kw):
    return {"progress": False, "log": lambda *_: None, **kw}


@pytest.fixture(scope="module")
def fm_checkpoint(tmp_path_factory):
    """A flow-matching `tiny` trained for a few steps (weights no longer at their zero init)."""
    out = tmp_path_factory.mktemp("fm") / "fm"
    train(TrainArgs(dataset="digits", preset="tiny", objective="fm", steps=30, batch_size=32, lr=2e-3,
                    out=str(out), eval_images=0), **quiet())
    return out


def test_gaussian_baseline_is_identity_transport_with_posterior_scale():
    cfg = get_preset("tiny").with_data(1, CLASSES).for_objective("gaussian")
    model = NTM(cfg)
    assert sum(p.numel() for p in model.transporter.parameters()) == 0
    x = torch.randn(3, 1, 8, 8)
    u, logdet = model.transporter(x, torch.full((3,), 0.3), 4)
    assert torch.equal(u, x) and torch.equal(logdet, torch.zeros(3))
    with torch.no_grad():  # even with a non-zero d head, sigma_P stays the posterior C
        for p in model.predictor.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    t, s = torch.full((3,), 0.5), torch.full((3,), 0.25)
    _, log_sigma, _ = model.predictor(x, t, s, torch.full((3,), 4.0), model.prompt_encoder(torch.ones(3, 1).long()),
                                      torch.ones(3, 1, dtype=torch.bool))
    C = 0.25 * ((0.5 - 0.25) * (0.5 + 0.25 - 2 * 0.5 * 0.25)) ** 0.5 / (0.5 * (1 - 0.25))
    assert torch.allclose(log_sigma, torch.full_like(log_sigma, np.log(C)))


def test_flow_matching_samples_with_euler_at_any_step_count(fm_checkpoint):
    model = NTM.from_pretrained(fm_checkpoint)
    assert model.config.objective == "fm"
    for steps in (4, 8, 64):
        images = sample_images(model, ["3", "5"], steps=steps, seed=0)
        assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8
    a, b = sample_images(model, ["3"], steps=4, seed=0), sample_images(model, ["3"], steps=4, seed=0, guidance=2.0)
    assert not np.array_equal(a, b)


def test_finetuned_ntm_starts_as_the_fm_posterior_sampler(fm_checkpoint):
    fm = NTM.from_pretrained(fm_checkpoint)
    config = finetune_config(fm.config, get_preset("tiny"), "ntm")
    assert config.objective == "ntm" and config.transporter.num_blocks == 2 and config.predictor.learn_scale
    torch.manual_seed(0)
    ntm = NTM(config)
    teacher = _init_from_fm(ntm, fm_checkpoint)
    ids, mask = ntm.tokenize(["1", "7", "7", ""])
    for guidance in (0.0, 1.5):
        u_fm, t0 = fm.sample_u(ids, mask, 4, np.random.default_rng(5), guidance, 0.025)
        u_ntm, _ = ntm.sample_u(ids, mask, 4, np.random.default_rng(5), guidance, 0.025)
        assert torch.equal(u_fm, u_ntm)  # same noise, same outputs before any update
        assert torch.equal(ntm.transporter.inverse(u_ntm, t0, 4), u_fm)
    # the trajectory likelihood agrees too: at step 0 the NTM is the FM's Gaussian posterior chain
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    traj = ntm.forward_trajectory(x0, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ntm.trajectory_nll(traj, ids), fm.trajectory_nll(traj, ids))
    # and the mean-alignment loss against the frozen teacher starts at zero
    losses = pairwise_loss(ntm, x0, ids, mask, torch.Generator().manual_seed(0), teacher)
    assert losses.align.item() == 0.0


def test_finetuning_trains_and_moves_away_from_identity(fm_checkpoint, tmp_path):
    out = tmp_path / "ft"
    summary = train(TrainArgs(dataset="digits", preset="tiny", init_from=str(fm_checkpoint), steps=15,
                              batch_size=16, out=str(out), eval_images=32), **quiet())
    assert np.isfinite(summary["heldout"]["bits_per_dim"])
    model = NTM.from_pretrained(out)
    x = torch.randn(2, 1, 8, 8)
    u, _ = model.transporter(x, torch.full((2,), 0.2), 4)
    assert not torch.equal(u, x)
    with pytest.raises(ConfigError, match="flow-matching checkpoint"):
        train(TrainArgs(dataset="digits", preset="tiny", init_from=str(out), steps=5, out=str(tmp_path / "x")),
              **quiet())


def test_finetuning_takes_the_given_hybrid_weight(fm_checkpoint, tmp_path):
    """--x0-mse-weight applies to a finetune as to a fresh run (it was silently the preset's), and a resume
    keeps the run's weight."""
    for weight, shown in ((None, 0.0), (0.5, 0.5)):  # tiny's preset weight is 0
        out = tmp_path / f"ft{shown}"
        train(TrainArgs(dataset="digits", preset="tiny", init_from=str(fm_checkpoint), steps=2, batch_size=4,
                        x0_mse_weight=weight, out=str(out), eval_images=0), **quiet())
        assert NTM.from_pretrained(out).config.x0_mse_weight == shown
    train(TrainArgs(dataset="digits", preset="tiny", init_from=str(fm_checkpoint), steps=3, batch_size=4,
                    out=str(out), eval_images=0), resume=True, **quiet())
    assert NTM.from_pretrained(out).config.x0_mse_weight == 0.5
    with pytest.raises(ConfigError, match="trained with --align-weight 2.5; resume it with the same value .got 0."):
        train(TrainArgs(dataset="digits", preset="tiny", init_from=str(fm_checkpoint), steps=4, batch_size=4,
                        align_weight=0.0, out=str(out), eval_images=0), resume=True, **quiet())  # it was taken


def test_finetuning_keeps_the_flow_matching_models_text_encoder(fm_checkpoint, tmp_path):
    """A finetune takes the FM checkpoint's prompt encoder; a --text-encoder naming another is refused
    before any work (it was ignored without a word), the one it has is accepted."""
    out = tmp_path / "ft"
    with pytest.raises(ConfigError, match=f"flow-matching model {fm_checkpoint} encodes prompts with "
                                          "--text-encoder labels"):
        train(TrainArgs(dataset="digits", preset="tiny", init_from=str(fm_checkpoint), steps=2, batch_size=4,
                        text_encoder="minilm", out=str(out), eval_images=0), **quiet())
    assert not out.exists()
    train(TrainArgs(dataset="digits", preset="tiny", init_from=str(fm_checkpoint), steps=1, batch_size=4,
                    text_encoder="labels", out=str(out), eval_images=0), **quiet())
    assert NTM.from_pretrained(out).config.prompt.kind == "label"


def test_bad_objective():
    with pytest.raises(ConfigError, match="ntm, gaussian, fm"):
        get_preset("tiny").for_objective("gan")


def test_identity_transporter_ablation_trains_with_exactly_zero_logdet(tmp_path):
    """`train --transporter-blocks 0` (issue 13): the NTM's predictor with its learned scale d and f_T =
    identity. It trains, its log-det is exactly 0, its d moves off the posterior scale, and the torch-free
    runtime samples the same images from its bundle as torch does."""
    from typer.testing import CliRunner

    from ntm_edge.cli import app
    from ntm_edge.export import export_bundle

    runner, ckpt = CliRunner(), tmp_path / "ablation"
    r = runner.invoke(app, ["train", "--dataset", "digits", "--preset", "tiny", "--transporter-blocks", "0",
                            "--steps", "30", "--batch-size", "32", "--lr", "2e-3", "--eval-images", "50",
                            "--out", str(ckpt)])
    assert r.exit_code == 0, r.output
    model = NTM.from_pretrained(ckpt)
    cfg = model.config
    assert cfg.objective == "ntm" and cfg.transporter.num_blocks == 0 and cfg.predictor.learn_scale
    assert sum(p.numel() for p in model.transporter.parameters()) == 0
    x = torch.randn(3, 1, 8, 8)
    u, logdet = model.transporter(x, torch.full((3,), 0.3), 4)
    assert torch.equal(u, x) and torch.equal(logdet, torch.zeros(3))
    t, s, T = torch.full((3,), 0.5), torch.full((3,), 0.25), torch.full((3,), 4.0)
    with torch.no_grad():
        _, log_sigma, _ = model.predictor(x, t, s, T, model.prompt_encoder(torch.ones(3, 1).long()),
                                          torch.ones(3, 1, dtype=torch.bool))
    C = 0.25 * ((0.5 - 0.25) * (0.5 + 0.25 - 2 * 0.5 * 0.25)) ** 0.5 / (0.5 * (1 - 0.25))
    assert (log_sigma - np.log(C)).abs().max() > 1e-3  # the learned scale: d is trained, not pinned to 0
    # the torch-free runtime reads a bundle without transporter graphs and draws the same images
    export_bundle(ckpt, tmp_path / "bundle", batch=4, log=lambda *_: None)
    ours = tmp_path / "run.npy"
    r = runner.invoke(app, ["run", "--bundle", str(tmp_path / "bundle"), "--prompt", "3", "--num", "4", "--seed", "1",
                            "--final", "inverse", "--out", str(tmp_path / "g.png"), "--save-array", str(ours),
                            "--provider", "cpu", "--threads", "1"])
    assert r.exit_code == 0, r.output
    theirs = sample_images(model, ["3"] * 4, steps=4, seed=1, final="inverse")
    assert np.abs(np.load(ours).astype(int) - theirs.astype(int)).max() <= 1


@pytest.mark.parametrize("objective", ["gaussian", "fm"])
def test_transporter_blocks_refused_for_a_baseline(objective, tmp_path):
    with pytest.raises(ConfigError, match="has no transporter"):
        TrainArgs(objective=objective, transporter_blocks=2, out=str(tmp_path / "x")).validate()
    with pytest.raises(ConfigError, match="whole number >= 0"):
        TrainArgs(transporter_blocks=-1, out=str(tmp_path / "x")).validate()
    with pytest.raises(ConfigError, match="unknown --x0-mse-space 'v'; choose one of: u, x"):
        TrainArgs(x0_mse_space="v", out=str(tmp_path / "x")).validate()
