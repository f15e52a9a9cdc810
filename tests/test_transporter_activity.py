"""The transporter's displacement and log-det per level (``evaluate.transporter_activity``, issue 13):
exactly 0 for an identity-initialised f_T, and the exact log|det| of the Jacobian once it moves."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from ntm_edge.config import get_preset
from ntm_edge.data import load_dataset
from ntm_edge.evaluate import transporter_activity
from ntm_edge.model import NTM
from ntm_edge.numerics import dequantize


def _model(num_blocks: int = 2) -> NTM:
    torch.manual_seed(0)
    cfg = get_preset("tiny").with_data(1, tuple(str(i) for i in range(10)))
    cfg = dataclasses.replace(cfg, transporter=dataclasses.replace(cfg.transporter, num_blocks=num_blocks))
    return NTM(cfg)


@pytest.fixture(scope="module")
def images():
    return load_dataset("digits", "test", image_size=8, channels=1).images[:16]


@pytest.mark.parametrize("num_blocks", [2, 0])
def test_identity_transporter_reads_exactly_zero(images, num_blocks):
    """A fresh transporter's output projections are zero, so mu = alpha = 0 and u = (x - 0) e^0 = x
    bit for bit: displacement and log-det are exactly 0 at every level (and with no blocks at all)."""
    levels = transporter_activity(_model(num_blocks), images, steps=4)
    assert len(levels) == 5 and levels[-1]["t"] == 1.0 and levels[0]["t"] == pytest.approx(0.025)
    assert [r["t"] for r in levels] == sorted(r["t"] for r in levels)
    for r in levels:
        assert r["displacement"] == 0.0 and r["shape_displacement"] == 0.0 and r["logdet_per_dim"] == 0.0, r


def _perturbed() -> NTM:
    model = _model()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.transporter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_moved_transporter_reports_its_exact_logdet(images):
    """Perturbed weights: displacement > 0 below t = 1 (exactly 0 at t = 1, the gate), and the log-det per
    dim equals log|det J| of the Jacobian of f_T computed by autograd on the same level, image by image."""
    model = _perturbed()
    n = 3
    levels = transporter_activity(model, images[:n], steps=4, seed=7)
    assert all(r["displacement"] > 1e-3 for r in levels[:-1]), levels
    assert levels[-1]["displacement"] == 0.0 and levels[-1]["logdet_per_dim"] == 0.0
    assert any(abs(r["logdet_per_dim"]) > 1e-4 for r in levels[:-1]), levels
    # the same trajectory, rebuilt with the same seed as transporter_activity draws it
    g = torch.Generator().manual_seed(7)
    traj = model.forward_trajectory(dequantize(torch.from_numpy(images[:n]), g), 4, generator=g)
    D, f64 = model.config.dims, copy.deepcopy(model).double()
    for k, r in enumerate(levels[:-1]):
        logdets, rels, shapes = [], [], []
        for b in range(n):
            x, t = traj.x[b, k].double(), traj.t[b, k].double()
            f = lambda v, t=t: f64.transporter(v.view(1, 1, 8, 8), t.view(1), 4)[0].flatten()  # noqa: E731
            J = torch.autograd.functional.jacobian(f, x.flatten())  # (D, D)
            logdets.append(float(torch.linalg.slogdet(J.double())[1]))
            with torch.no_grad():
                u, v = f(x.flatten()), x.flatten()
                rels.append(float((u - v).norm() / v.norm()))
                c = float(u @ v / (v @ v))  # the best uniform rescale of x towards u
                shapes.append(float((u - c * v).norm() / (c * v).norm()))
        assert r["logdet_per_dim"] == pytest.approx(sum(logdets) / n / D, abs=1e-5)
        assert r["displacement"] == pytest.approx(sum(rels) / n, rel=1e-4)
        assert r["shape_displacement"] == pytest.approx(sum(shapes) / n, rel=1e-4)
        assert 0 < r["shape_displacement"]



def test_transporter_learning_rate_scale_makes_two_groups():
    """--transporter-lr-scale: the transporter's weights in their own AdamW group at lr x scale, every
    other weight in one group at lr; at scale 1 one group (so earlier checkpoints' optimizer state loads)."""
    from ntm_edge.train import param_groups

    model = _model()
    assert [g["lr_scale"] for g in param_groups(model, 1.0)] == [1.0]
    assert len(param_groups(model, 1.0)[0]["params"]) == len(list(model.parameters()))
    groups = param_groups(model, 10.0)
    assert [g["lr_scale"] for g in groups] == [10.0, 1.0]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.transporter.parameters()}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    assert [g["lr_scale"] for g in param_groups(_model(num_blocks=0), 10.0)] == [1.0]  # nothing to scale


def test_transporter_learning_rate_scale_in_a_real_run(tmp_path):
    """Two real training steps with --transporter-lr-scale 10: the saved optimizer's transporter group runs at
    10x the other group's rate; resuming with another scale is refused in one line, before any step."""
    from ntm_edge.errors import ConfigError
    from ntm_edge.train import TrainArgs, train

    out = tmp_path / "run"
    args = TrainArgs(dataset="digits", preset="tiny", steps=2, batch_size=8, out=str(out), eval_images=0,
                     transporter_lr_scale=10.0)
    train(args, progress=False, log=lambda *_: None)
    groups = torch.load(out / "train_state.pt", weights_only=False)["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [10.0, 1.0]
    assert groups[0]["lr"] == pytest.approx(10 * groups[1]["lr"]) and groups[1]["lr"] > 0
    with pytest.raises(ConfigError, match="transporter-lr-scale"):
        train(dataclasses.replace(args, steps=3, transporter_lr_scale=1.0), progress=False, log=lambda *_: None,
              resume=True)


def test_transporter_shape_options_in_a_real_run(tmp_path):
    """--transporter-patch/-layers/-width reach the saved config; the trained patch-1 f_T moves and
    still inverts exactly; a resume with another shape is refused in one line."""
    from ntm_edge.checkpoint import load_model
    from ntm_edge.errors import ConfigError
    from ntm_edge.train import TrainArgs, train

    out = tmp_path / "run"
    args = TrainArgs(dataset="digits", preset="tiny", steps=3, batch_size=8, out=str(out), eval_images=0,
                     transporter_patch=1, transporter_layers=2, transporter_width=16, transporter_lr_scale=50.0)
    train(args, progress=False, log=lambda *_: None)
    model = load_model(out).double()
    cfg = model.config.transporter
    assert (cfg.patch_size, cfg.layers_per_block, cfg.width, cfg.num_blocks) == (1, 2, 16, 2)
    x = dequantize(torch.from_numpy(load_dataset("digits", "test", image_size=8, channels=1).images[:4]),
                   torch.Generator().manual_seed(0)).double()
    t = torch.full((4,), 0.25, dtype=torch.double)
    with torch.no_grad():
        u, logdet = model.transporter(x, t, torch.full((4,), 4.0, dtype=torch.double))
        assert (u - x).abs().max() > 1e-4  # three steps at 50x the rate moved it
        back = model.transporter.inverse(u, t, torch.full((4,), 4.0, dtype=torch.double))
    assert (back - x).abs().max() < 1e-9
    with pytest.raises(ConfigError, match="--transporter-patch"):
        train(dataclasses.replace(args, steps=4, transporter_patch=2), progress=False, log=lambda *_: None, resume=True)


@pytest.mark.parametrize("given, message", [
    (dict(transporter_patch=0), "--transporter-patch must be a whole number >= 1"),
    (dict(transporter_layers=True), "--transporter-layers must be a whole number >= 1"),
    (dict(transporter_width=16, transporter_blocks=0), "--transporter-width shapes the transporter, and this run "
                                                       "has none (--transporter-blocks 0)"),
    (dict(transporter_patch=1, objective="fm"), "this run has none (--objective fm)"),
])
def test_transporter_shape_options_are_checked_up_front(tmp_path, given, message):
    from ntm_edge.errors import ConfigError
    from ntm_edge.train import TrainArgs

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainArgs(out=str(tmp_path / "x"), **given).validate()
