"""`train --pairwise-steps`: the grids pairwise training draws its (t, s) steps from (issue 13)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from ntm_edge import schedule
from ntm_edge.checkpoint import trained_steps
from ntm_edge.cli import app
from ntm_edge.config import get_preset
from ntm_edge.errors import ConfigError
from ntm_edge.losses import pairwise_loss
from ntm_edge.model import NTM
from ntm_edge.train import TrainArgs, train


def _steps_drawn(step_counts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pairwise loss on 256 examples of a fresh tiny model -> (s, t, T) of every example, (256,) each,
    read off what the transporter is called with (x_s and x_t of the batch stacked)."""
    torch.manual_seed(0)
    model = NTM(get_preset("tiny").with_data(1, tuple(str(i) for i in range(10))))
    calls = []
    model.transporter.register_forward_hook(lambda _m, args, _out: calls.append((args[1].clone(), args[2].clone())))
    B = 256
    x0 = torch.rand(B, 1, 8, 8) * 2 - 1
    ids, mask = torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.bool)
    pairwise_loss(model, x0, ids, mask, torch.Generator().manual_seed(1), step_counts=step_counts)
    (levels, T), = calls
    assert torch.equal(T[:B], T[B:])  # both sides of a step on the same grid
    return levels[:B], levels[B:], T[:B]


def test_four_step_grid_alone():
    """--pairwise-steps 4: every example's T is 4, t is one of the 4-step grid's levels (each drawn), and s
    is the level just below it (t_min, drawn in [t_min_low, t_min_max], below t = 0.25)."""
    s, t, T = _steps_drawn((4,))
    assert (T == 4).all()
    assert {round(float(v), 6) for v in t} == {0.25, 0.5, 0.75, 1.0}
    upper = t > 0.25
    torch.testing.assert_close(s[upper], t[upper] - 0.25)
    cfg = get_preset("tiny")
    assert ((s[~upper] >= cfg.t_min_low) & (s[~upper] <= cfg.t_min_max)).all() and (~upper).any()


def test_default_grids_are_4_8_16():
    s, t, T = _steps_drawn(schedule.STEP_COUNTS)
    assert {int(v) for v in T} == {4, 8, 16}
    fine = (T == 16) & (t > 1 / 16)
    torch.testing.assert_close(s[fine], t[fine] - 1 / 16)  # the finest grid's steps, one level each
    assert fine.any()


@pytest.fixture(scope="module")
def pw4_run(tmp_path_factory):
    """(checkpoint, its TrainArgs, train's log lines) of a 2-step pairwise run on the 4-step grid alone."""
    out = tmp_path_factory.mktemp("pw4") / "run"
    args = TrainArgs(dataset="digits", preset="tiny", steps=2, batch_size=8, out=str(out), eval_images=0,
                     mode="pairwise", pairwise_steps=(4,))
    lines: list[str] = []
    train(args, progress=False, log=lines.append)
    return out, args, lines


def test_trained_step_counts():
    assert schedule.trained_step_counts("ntm", "pairwise", None, 4) == (4, 8, 16)
    assert schedule.trained_step_counts("gaussian", "pairwise", [4, 8], 4) == (4, 8)
    assert schedule.trained_step_counts("ntm", "end2end", None, 6) == (6,)
    assert schedule.trained_step_counts("fm", "pairwise", (4,), 4) is None  # Euler at any T


def test_scoring_step_count():
    assert schedule.scoring_step_count((4, 8, 16), 4) == 4
    assert schedule.scoring_step_count(None, 4) == 4  # flow matching: any T
    assert schedule.scoring_step_count((2,), 4) == 2
    assert schedule.scoring_step_count((3, 5), 4) == 5  # a tie goes to the finer grid
    assert schedule.scoring_step_count((8, 16), 4) == 8


def test_train_scores_a_two_step_model_on_its_own_grid(tmp_path):
    """A run trained on the 2-step grid alone reports its held-out likelihood at T = 2 (it once reported a
    meaningless bound on the 4-step grid), and the figure is the one eval's scorer gives at T = 2."""
    from ntm_edge.checkpoint import load_model
    from ntm_edge.data import load_dataset
    from ntm_edge.evaluate import heldout_likelihood

    args = TrainArgs(dataset="digits", preset="tiny", steps=2, batch_size=8, out=str(tmp_path / "run"),
                     eval_images=16, mode="pairwise", pairwise_steps=(2,))
    lines: list[str] = []
    summary = train(args, progress=False, log=lines.append)
    assert summary["heldout"]["steps"] == 2
    assert any(line.startswith("held-out (16 images, T = 2)") for line in lines), lines
    model = load_model(tmp_path / "run")
    test = load_dataset("digits", "test", image_size=model.config.image_size, seed=0)
    at2 = heldout_likelihood(model, test.images[:16], test.labels[:16], steps=2)
    at4 = heldout_likelihood(model, test.images[:16], test.labels[:16], steps=4)
    assert summary["heldout"]["bits_per_dim"] == pytest.approx(at2["bits_per_dim"], rel=1e-6)
    assert at4["bits_per_dim"] != pytest.approx(at2["bits_per_dim"], rel=1e-3)


def test_other_step_counts_than_the_trained_ones_are_warned(pw4_run, tmp_path):
    """The checkpoint and its bundle record T in {4}; sample, eval's checks and run warn at --steps 8, not at 4."""
    from ntm_edge.checkpoint import META, load_info, trained_steps
    from ntm_edge.export import export_bundle
    from ntm_edge.fileio import seal

    out = pw4_run[0]
    assert load_info(out)["trained_steps"] == [4] and trained_steps(out) == (4,)
    warning = "warning: this model was trained at --steps 4 only; at --steps 8 it runs on a grid it never saw"
    runner = CliRunner()
    common = ["--prompt", "3", "--num", "2", "--out", str(tmp_path / "s.png")]
    r = runner.invoke(app, ["sample", "--checkpoint", str(out), "--steps", "8", *common])
    assert r.exit_code == 0 and warning in r.output, r.output
    r = runner.invoke(app, ["sample", "--checkpoint", str(out), "--steps", "4", *common])
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    bundle = tmp_path / "bundle"
    export_bundle(out, bundle, batch=2, parity=False, log=lambda *_: None)
    assert json.loads((bundle / "manifest.json").read_text())["schedule"]["trained_steps"] == [4]
    r = runner.invoke(app, ["run", "--bundle", str(bundle), "--steps", "8", *common, "--save-array", str(tmp_path / "s.npy")])
    assert r.exit_code == 0 and warning in r.output, r.output
    r = runner.invoke(app, ["audit", "--bundle", str(bundle), "--image", str(tmp_path / "s.npy"), "--prompt", "3",
                            "--steps", "8", "--trajectories", "1"])
    assert r.exit_code == 0 and warning in r.output and "bits/dim" in r.output, r.output
    # a checkpoint of an earlier version, without the record: read from the arguments in its train state
    old = tmp_path / "old"
    shutil.copytree(out, old)
    info = {k: v for k, v in load_info(old).items() if k not in ("trained_steps", "self_sha256")}
    (old / META).write_text(json.dumps(seal(info)))
    assert "trained_steps" not in load_info(old) and trained_steps(old) == (4,)


def test_a_real_run_records_the_grids_and_resume_must_match(pw4_run):
    out, args, lines = pw4_run
    assert "pairwise, T in {4}" in lines[0]
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert tuple(state["args"]["pairwise_steps"]) == (4,)
    with pytest.raises(ConfigError, match=r"trained with --pairwise-steps 4; resume it with the same value \(got 4,8\)"):
        train(dataclasses.replace(args, steps=3, pairwise_steps=(4, 8)), progress=False, log=lambda *_: None, resume=True)
    train(dataclasses.replace(args, steps=3), progress=False, log=lambda *_: None, resume=True)  # the same: resumes
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 3
    resumed: list[str] = []  # left out on a resume: the run's own grids (before 2026-12-07: 4,8,16, refused)
    train(dataclasses.replace(args, steps=4, pairwise_steps=None), progress=False, log=resumed.append, resume=True)
    assert any("pairwise, T in {4}" in line for line in resumed) and trained_steps(out) == (4,)
    assert tuple(torch.load(out / "train_state.pt", weights_only=False)["args"]["pairwise_steps"]) == (4,)


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
