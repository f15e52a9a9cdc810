"""The hybrid x0-MSE term compares the predictor's x0-hat with x0 in one space (issue 13): its target is
f_T(x0, s), x0 in the u-space of the level being predicted (``losses.x0_target``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ntm_edge.config import get_preset
from ntm_edge.losses import end2end_loss, pairwise_loss, x0_target
from ntm_edge.model import NTM

CLASSES = tuple(str(i) for i in range(10))


def _model(moved: bool, num_blocks: int = 2) -> NTM:
    torch.manual_seed(0)
    cfg = get_preset("tiny").with_data(1, CLASSES)
    model = NTM(dataclasses.replace(cfg, transporter=dataclasses.replace(cfg.transporter, num_blocks=num_blocks)))
    if moved:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in [*model.transporter.parameters(), *model.predictor.parameters()]:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _batch():
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    ids = torch.randint(1, 11, (6, 1), generator=g)
    return x0, ids, torch.ones_like(ids, dtype=torch.bool)


def test_target_is_x0_through_the_transporter_of_level_s():
    model = _model(moved=True)
    x0 = _batch()[0]
    s, T = torch.linspace(0.02, 0.7, 6), torch.full((6,), 4.0)
    target = x0_target(model, x0, s, T)
    assert not target.requires_grad  # a fixed target: f_T is not trained to shrink u-space by this term
    assert torch.equal(target, model.transporter(x0, s, T)[0].detach())
    assert (target - x0).abs().max() > 1e-3  # a moved transporter: u-space differs from x-space
    assert torch.equal(x0_target(model, x0, s, T, "x"), x0)
    assert torch.equal(x0_target(_model(moved=False), x0, s, T), x0)  # identity at init: the same target


@pytest.mark.parametrize("loss", [end2end_loss, pairwise_loss])
def test_u_and_x_targets_agree_exactly_only_for_an_identity_transporter(loss):
    x0, ids, mask = _batch()
    for model, same in ((_model(moved=False), True), (_model(moved=True, num_blocks=0), True),
                        (_model(moved=True), False)):
        u = loss(model, x0, ids, mask, torch.Generator().manual_seed(5), x0_space="u")
        x = loss(model, x0, ids, mask, torch.Generator().manual_seed(5), x0_space="x")
        assert torch.equal(u.main, x.main)  # the NLL does not depend on the hybrid target
        assert torch.equal(u.x0_mse, x.x0_mse) == same, (u.x0_mse, x.x0_mse)


def test_end2end_term_is_the_mean_over_steps_against_each_level_s():
    """The end-to-end term by hand: step k predicts level k - 1, so its target is f_T(x0, t_(k-1))."""
    model = _model(moved=True)
    x0, ids, mask = _batch()
    losses = end2end_loss(model, x0, ids, mask, torch.Generator().manual_seed(5), x0_space="u")
    g = torch.Generator().manual_seed(5)  # end2end_loss's draws, in its order
    from ntm_edge.losses import draw_t_min

    traj = model.forward_trajectory(x0, 4, generator=g, t_min=draw_t_min(model.config, 6, g, x0.device))
    _, _, x0_hat = model.trajectory_terms(traj, ids, mask)  # (B, T, C, H, W)
    errs = [(x0_hat[:, k - 1] - model.transporter(x0, traj.t[:, k - 1], 4)[0]).pow(2).mean() for k in range(1, 5)]
    assert losses.x0_mse.item() == pytest.approx(torch.stack(errs).mean().item(), rel=1e-5)
