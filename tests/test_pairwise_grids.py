"""`train --pairwise-steps`: the grids pairwise training draws its (t, s) steps from (issue 13)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from typer.testing import CliRunner

from ntm_edge import schedule
from ntm_edge.cli import app
from ntm_edge.config import get_preset
from ntm_edge.errors import ConfigError
from ntm_edge.losses import pairwise_loss
from ntm_edge.model import NTM
from ntm_edge.train import TrainArgs, train


def _levels_seen(step_counts) -> tuple[set[tuple[float, int]], set[float], list[float]]:
    """One pairwise loss on 256 examples of a fresh tiny model -> (the (t, T) pairs, the s > t_min_max seen,
    all s at or below t_min_max), read off what the transporter is called with (x_s and x_t stacked)."""
    torch.manual_seed(0)
    model = NTM(get_preset("tiny").with_data(1, tuple(str(i) for i in range(10))))
    calls = []
    model.transporter.register_forward_hook(lambda _m, args, _out: calls.append((args[1].clone(), args[2].clone())))
    B = 256
    x0 = torch.rand(B, 1, 8, 8) * 2 - 1
    ids, mask = torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.bool)
    pairwise_loss(model, x0, ids, mask, torch.Generator().manual_seed(1), step_counts=step_counts)
    (levels, T), = calls
    s, t, T = levels[:B], levels[B:], T[:B]
    pairs = {(round(float(a), 6), int(b)) for a, b in zip(t, T, strict=True)}
    cfg = model.config
    upper = {round(float(v), 6) for v in s if v > cfg.t_min_max}
    lowest = [float(v) for v in s if v <= cfg.t_min_max]
    return pairs, upper, lowest


def test_four_step_grid_alone():
    """--pairwise-steps 4: every example's T is 4, t is one of the 4-step grid's levels (each drawn), and s
    is the level below it (t_min at the bottom)."""
    pairs, upper, lowest = _levels_seen((4,))
    assert pairs == {(0.25, 4), (0.5, 4), (0.75, 4), (1.0, 4)}
    assert upper == {0.25, 0.5, 0.75}
    cfg = get_preset("tiny")
    assert lowest and all(cfg.t_min_low <= v <= cfg.t_min_max for v in lowest)


def test_default_grids_are_4_8_16():
    pairs, _, _ = _levels_seen(schedule.STEP_COUNTS)
    assert {T for _, T in pairs} == {4, 8, 16}
    assert {t for t, T in pairs if T == 16} > {0.0625, 1.0}  # the finest grid's levels are drawn too


def test_a_real_run_records_the_grids_and_resume_must_match(tmp_path):
    out = tmp_path / "run"
    args = TrainArgs(dataset="digits", preset="tiny", steps=2, batch_size=8, out=str(out), eval_images=0,
                     mode="pairwise", pairwise_steps=(4,))
    lines: list[str] = []
    train(args, progress=False, log=lines.append)
    assert "pairwise, T in {4}" in lines[0]
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert tuple(state["args"]["pairwise_steps"]) == (4,)
    with pytest.raises(ConfigError, match=r"trained with --pairwise-steps 4; resume it with the same value \(got 4,8,16\)"):
        train(dataclasses.replace(args, steps=3, pairwise_steps=None), progress=False, log=lambda *_: None, resume=True)
    train(dataclasses.replace(args, steps=3), progress=False, log=lambda *_: None, resume=True)  # the same: resumes
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 3


@pytest.mark.parametrize("value, message", [
    ("4,4", "--pairwise-steps must be distinct whole numbers, got 4,4"),
    ("4;8", "--pairwise-steps takes whole numbers separated by commas (like 4,8,16), got '4;8'"),
    ("0", "--pairwise-steps must be at least 1, got 0"),
    ("40", "--pairwise-steps 40 is past what the schedule supports"),
])
def test_bad_values_are_one_line_before_any_work(tmp_path, value, message):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--mode", "pairwise", "--pairwise-steps", value, "--out", str(out)])
    assert r.exit_code == 1 and r.output.startswith("error: " + message), r.output
    assert r.output.count("\n") == 1 and not out.exists()


def test_refused_where_there_is_no_pairwise_training(tmp_path):
    with pytest.raises(ConfigError, match=r"this run trains end2end \(pass --mode pairwise\)"):
        TrainArgs(preset="tiny", pairwise_steps=(4,), out=str(tmp_path / "x")).validate()
    with pytest.raises(ConfigError, match="this run trains flow matching"):
        TrainArgs(preset="small", objective="fm", pairwise_steps=(4,), out=str(tmp_path / "x")).validate()
    TrainArgs(preset="small", pairwise_steps=(4,), out=str(tmp_path / "x")).validate()  # small is pairwise
