"""Training, checkpoints and resume: real runs of the `tiny` preset on scikit-learn's digits."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import TRAIN_MODE, TRAIN_STEPS

from ntm_edge import NTM
from ntm_edge.checkpoint import load_train_state, trained_steps
from ntm_edge.config import get_preset
from ntm_edge.data import load_dataset
from ntm_edge.errors import CheckpointError, ConfigError, NtmError
from ntm_edge.evaluate import heldout_likelihood
from ntm_edge.exits import sample_images
from ntm_edge.train import TrainArgs, train


def quiet(**kw):
    return {"progress": False, "log": lambda *_: None, **kw}


def test_training_lowers_heldout_nll(trained_tiny):
    ckpt, summary = trained_tiny
    test = load_dataset("digits", "test")
    torch.manual_seed(0)
    fresh = NTM(get_preset("tiny").with_data(1, test.class_names))
    before = heldout_likelihood(fresh, test.images, test.labels)["bits_per_dim"]
    after = summary["heldout"]["bits_per_dim"]
    # the same number from the saved EMA weights, re-loaded
    reloaded = heldout_likelihood(NTM.from_pretrained(ckpt), test.images, test.labels)["bits_per_dim"]
    assert reloaded == pytest.approx(after, rel=1e-6)
    assert after < before - 10, (before, after)
    assert after < 7.5, f"{after:.2f} bits/dim: barely better than a uniform 8-bit model (8)"


def test_save_load_round_trip(trained_tiny, tmp_path):
    ckpt, _ = trained_tiny
    model = NTM.from_pretrained(ckpt)
    model.save_pretrained(tmp_path / "copy")
    again = NTM.from_pretrained(tmp_path / "copy")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert (sample_images(model, ["3", "7"], seed=1) == sample_images(again, ["3", "7"], seed=1)).all()


@pytest.mark.parametrize("text_encoder", ["labels", "minilm"])
def test_resume_continues_the_same_run(tmp_path, text_encoder):
    """Bit for bit, also with captions (the caption draw takes its randomness from the run's generator)."""
    base = dict(dataset="digits", preset="tiny", batch_size=16, checkpoint_every=100, eval_images=0, seed=3,
                text_encoder=text_encoder)
    train(TrainArgs(steps=12, out=str(tmp_path / "straight"), **base), **quiet())
    train(TrainArgs(steps=6, out=str(tmp_path / "split"), **base), **quiet())
    train(TrainArgs(steps=12, out=str(tmp_path / "split"), **base), resume=True, **quiet())
    a, b = load_train_state(tmp_path / "straight"), load_train_state(tmp_path / "split")
    assert a["step"] == b["step"] == 12
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"


def test_a_resume_may_change_the_schedule(tmp_path):
    """--lr (like --steps) is the schedule, not the model: a resume takes the new one (the README says so)."""
    base = dict(dataset="digits", preset="tiny", batch_size=8, checkpoint_every=100, eval_images=0, seed=1)
    train(TrainArgs(steps=3, out=str(tmp_path / "a"), **base), **quiet())
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    train(TrainArgs(steps=5, out=str(tmp_path / "a"), **base), resume=True, **quiet())
    train(TrainArgs(steps=5, lr=TrainArgs().lr / 4, out=str(tmp_path / "b"), **base), resume=True, **quiet())
    a, b = load_train_state(tmp_path / "a"), load_train_state(tmp_path / "b")
    lr_a, lr_b = (s["optimizer"]["param_groups"][0]["lr"] for s in (a, b))
    assert lr_b == pytest.approx(lr_a / 4)  # the last step ran at the new rate
    assert any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_pairwise_mode_trains(tmp_path):
    args = TrainArgs(dataset="digits", preset="tiny", steps=5, batch_size=8, out=str(tmp_path / "p"),
                     mode="pairwise", eval_images=16)
    summary = train(args, **quiet())
    assert summary["mode"] == "pairwise" and summary["step"] == 5
    assert torch.isfinite(torch.tensor(summary["heldout"]["bits_per_dim"]))


def test_refuses_to_overwrite_a_checkpoint(trained_tiny, tmp_path):
    ckpt, _ = trained_tiny
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    with pytest.raises(NtmError, match="already holds a checkpoint"):
        train(TrainArgs(dataset="digits", preset="tiny", steps=5, out=str(copy), **TRAIN_MODE), **quiet())
    with pytest.raises(ConfigError, match="already at step"):
        train(TrainArgs(dataset="digits", preset="tiny", steps=5, out=str(copy), **TRAIN_MODE), resume=True, **quiet())
    with pytest.raises(ConfigError, match="trained with --dataset .digits.; resume it with the same value"):
        train(TrainArgs(dataset="mnist5k", preset="tiny", steps=500, out=str(copy), **TRAIN_MODE), resume=True, **quiet())
    with pytest.raises(ConfigError, match="trained with --x0-mse-weight 0.0; resume it with the same value .got 0.5."):
        train(TrainArgs(dataset="digits", preset="tiny", steps=500, x0_mse_weight=0.5, out=str(copy), **TRAIN_MODE), resume=True,
              **quiet())
    with pytest.raises(ConfigError, match="trained with --seed 0; resume it with the same value .got 5."):
        train(TrainArgs(dataset="digits", preset="tiny", steps=500, seed=5, out=str(copy), **TRAIN_MODE), resume=True, **quiet())
    with pytest.raises(ConfigError, match="encodes prompts with --text-encoder labels, which it keeps; drop "
                                          "--text-encoder minilm or pass labels"):  # it was ignored
        train(TrainArgs(dataset="digits", preset="tiny", steps=500, text_encoder="minilm", out=str(copy), **TRAIN_MODE),
              resume=True, **quiet())
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before



def test_a_resume_keeps_the_runs_mode_and_grids(trained_tiny, tmp_path):
    """A resume without --mode / --pairwise-steps continues with the run's own (trained_tiny trains pairwise on the
    4-step grid, while `tiny`'s own mode is end2end and the default grids are 4,8,16: a missing flag used to mean
    those, which refused the run or, for --mode, switched it to end2end without a word); given ones must match."""
    ckpt, _ = trained_tiny
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    base = dict(dataset="digits", preset="tiny", steps=TRAIN_STEPS + 2, out=str(copy), eval_images=0)
    with pytest.raises(ConfigError, match="trained with --mode pairwise; resume it with the same value .got end2end."):
        train(TrainArgs(**base, mode="end2end"), resume=True, **quiet())
    with pytest.raises(ConfigError, match="trained with --pairwise-steps 4; resume it with the same value .got 4,8."):
        train(TrainArgs(**base, mode="pairwise", pairwise_steps=(4, 8)), resume=True, **quiet())
    assert load_train_state(copy)["step"] == TRAIN_STEPS  # the refusals touched nothing
    summary = train(TrainArgs(**base), resume=True, **quiet())
    assert summary["mode"] == "pairwise" and summary["step"] == TRAIN_STEPS + 2
    assert trained_steps(copy) == (4,)
    assert load_train_state(copy)["args"]["pairwise_steps"] in ([4], (4,))  # a later resume finds the same

@pytest.mark.parametrize("bad", [{"mode": "sideways"}, {"steps": 0}, {"preset": "huge"}, {"align_weight": -1.0},
                                 {"align_weight": float("nan")}])
def test_bad_arguments(bad, tmp_path):
    with pytest.raises(ConfigError):
        train(TrainArgs(out=str(tmp_path / "x"), **bad), **quiet())
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_weights", "bad_config", "missing_meta", "truncate_state"])
def test_corrupt_checkpoint_is_one_clear_error(trained_tiny, tmp_path, damage):
    ckpt, _ = trained_tiny
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    weights = bad / "model.safetensors"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "flip_weights":
        data = bytearray(weights.read_bytes())
        data[-7] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "bad_config":
        (bad / "config.json").write_text('{"image_size": 8, ')
    elif damage == "missing_meta":
        (bad / "checkpoint.json").unlink()
    else:
        state = bad / "train_state.pt"
        state.write_bytes(state.read_bytes()[:5000])
    with pytest.raises(CheckpointError) as err:
        if damage == "truncate_state":
            load_train_state(bad)
        else:
            NTM.from_pretrained(bad)
    assert "\n" not in str(err.value)
    assert str(bad) in str(err.value)


def test_x0_mse_weight_overrides_the_preset(tmp_path):
    out = tmp_path / "w"
    train(TrainArgs(dataset="digits", preset="small", steps=1, batch_size=2, x0_mse_weight=0.0, out=str(out),
                    eval_images=0, mode="pairwise"), **quiet())
    assert get_preset("small").x0_mse_weight == 1.0
    assert NTM.from_pretrained(out).config.x0_mse_weight == 0.0
