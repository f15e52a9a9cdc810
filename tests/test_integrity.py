"""Every file that training and sampling load is verified: a damaged or edited file is one clear
line and exit status 1, never a traceback and never exit 0 with a wrong result. Damage is done to
copies of a real trained checkpoint (flipped bytes, truncation, edited values, removal)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ntm_edge import NTM
from ntm_edge.checkpoint import load_train_state
from ntm_edge.cli import app
from ntm_edge.config import NTMConfig, get_preset
from ntm_edge.denoiser import Denoiser, DenoiserConfig, load_denoiser, save_denoiser
from ntm_edge.errors import CheckpointError, ConfigError
from ntm_edge.fileio import seal, sha256_file

runner = CliRunner()


@pytest.fixture(scope="module")
def source(trained_tiny, tmp_path_factory):
    """A copy of the trained tiny checkpoint with a (randomly initialised) denoiser saved into it."""
    ckpt = tmp_path_factory.mktemp("integrity") / "ckpt"
    shutil.copytree(trained_tiny[0], ckpt)
    cfg = NTM.from_pretrained(ckpt).config
    torch.manual_seed(0)
    den = Denoiser(DenoiserConfig(image_size=cfg.image_size, channels=cfg.channels,
                                  num_prompt_tokens=len(cfg.prompt.class_names) + 1, t0=cfg.t_min_sample,
                                  steps=cfg.steps, prompt_dim=cfg.prompt.dim, width=32, depth=1, heads=2))
    save_denoiser(den, ckpt, {"dataset": "digits"})
    return ckpt


def flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x5A
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


def reseal(ckpt: Path) -> None:
    """Re-hash config.json into checkpoint.json: what a user who edits both files by hand would do."""
    meta = {k: v for k, v in json.loads((ckpt / "checkpoint.json").read_text()).items() if k != "self_sha256"}
    meta["config_sha256"] = sha256_file(ckpt / "config.json")
    (ckpt / "checkpoint.json").write_text(json.dumps(seal(meta)))


def one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(ckpt: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(ckpt.iterdir())}


DAMAGE = {
    "config.json flipped": ("config.json", lambda p: flip(p, 0.3)),
    "config.json truncated": ("config.json", truncate),
    "config.json edited": ("config.json", lambda p: edit_json(p, steps=8)),
    "config.json removed": ("config.json", Path.unlink),
    "model.safetensors flipped (data)": ("model.safetensors", lambda p: flip(p, 0.9)),
    "model.safetensors flipped (header)": ("model.safetensors", lambda p: flip(p, 0.0005)),
    "model.safetensors truncated": ("model.safetensors", truncate),
    "model.safetensors removed": ("model.safetensors", Path.unlink),
    "checkpoint.json flipped": ("checkpoint.json", lambda p: flip(p, 0.5)),
    "checkpoint.json truncated": ("checkpoint.json", truncate),
    "checkpoint.json edited dataset": ("checkpoint.json", lambda p: edit_json(p, dataset="mnist5k")),
    "checkpoint.json edited step": ("checkpoint.json", lambda p: edit_json(p, step=5)),
    "checkpoint.json edited version": ("checkpoint.json", lambda p: edit_json(p, format_version=7)),
    "checkpoint.json removed": ("checkpoint.json", Path.unlink),
    "denoiser.json flipped": ("denoiser.json", lambda p: flip(p, 0.4)),
    "denoiser.json truncated": ("denoiser.json", truncate),
    "denoiser.json edited t0": ("denoiser.json", lambda p: edit_json(p, config={**json.loads(p.read_text())["config"],
                                                                                 "t0": 0.2})),
    "denoiser.safetensors flipped": ("denoiser.safetensors", lambda p: flip(p, 0.7)),
    "denoiser.safetensors truncated": ("denoiser.safetensors", truncate),
    "denoiser.safetensors removed": ("denoiser.safetensors", Path.unlink),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_file_is_one_line_for_sample(source, tmp_path, damage):
    name, hurt = DAMAGE[damage]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    hurt(ckpt / name)
    before = snapshot(ckpt)
    result = runner.invoke(app, ["sample", "--checkpoint", str(ckpt), "--prompt", "3", "--num", "2",
                                 "--out", str(tmp_path / "s.png")])  # the denoiser is its default exit
    one_error_line(result, name, *(["train-denoiser"] if name.startswith("denoiser") else []))
    assert not (tmp_path / "s.png").exists()
    assert snapshot(ckpt) == before


TRAIN_STATE_DAMAGE = {
    "flipped": lambda p: flip(p, 0.6),
    "flipped near the end": lambda p: flip(p, 0.999),
    "truncated": truncate,
    "replaced by another save": None,  # a train_state.pt of another step: its hash is not the recorded one
}


@pytest.mark.parametrize("damage", list(TRAIN_STATE_DAMAGE))
def test_damaged_train_state_is_refused_on_resume(source, tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    state = ckpt / "train_state.pt"
    if TRAIN_STATE_DAMAGE[damage] is None:
        s = load_train_state(ckpt)
        s["step"] += 1
        torch.save(s, state)
    else:
        TRAIN_STATE_DAMAGE[damage](state)
    before = snapshot(ckpt)
    result = runner.invoke(app, ["train", "--dataset", "digits", "--preset", "tiny", "--steps", "400", "--out", str(ckpt),
                                 "--resume", "--eval-images", "0"])
    one_error_line(result, "train_state.pt", "sha256")
    assert snapshot(ckpt) == before


def test_resume_refuses_a_checkpoint_that_does_not_hash_its_train_state(source, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    NTM.from_pretrained(ckpt).save_pretrained(ckpt)  # checkpoint.json rewritten without a train-state hash
    with pytest.raises(CheckpointError, match="records no sha256 of train_state.pt"):
        load_train_state(ckpt)


    assert not (tmp_path / "s.png").exists()


def test_good_copies_load(source, tmp_path):
    """The damage tests above fail for the damage, not for the copy: an undamaged copy loads and samples."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    result = runner.invoke(app, ["sample", "--checkpoint", str(ckpt), "--prompt", "3", "--num", "2",
                                 "--final", "denoiser", "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    assert load_denoiser(ckpt).config.t0 == NTM.from_pretrained(ckpt).config.t_min_sample
    assert load_train_state(ckpt)["step"] == json.loads((ckpt / "checkpoint.json").read_text())["step"]


def test_format_1_checkpoint_samples_but_is_not_resumed(source, tmp_path):
    """checkpoint.json as the previous ntm-edge wrote it (format 1: weights hash only, no seal)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    old = {k: meta[k] for k in ("step", "weights_sha256", "dataset", "preset", "objective")}
    (ckpt / "checkpoint.json").write_text(json.dumps({"format_version": 1, **old}))
    (ckpt / "denoiser.json").unlink()
    result = runner.invoke(app, ["sample", "--checkpoint", str(ckpt), "--prompt", "3", "--num", "2",
                                 "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "--dataset", "digits", "--preset", "tiny", "--steps", "400", "--out", str(ckpt),
                                 "--resume", "--eval-images", "0"])
    one_error_line(result, "records no sha256 of train_state.pt")
    flip(ckpt / "model.safetensors", 0.9)  # its weights are still verified
    result = runner.invoke(app, ["sample", "--checkpoint", str(ckpt), "--prompt", "3", "--out", str(tmp_path / "t.png")])
    one_error_line(result, "model.safetensors does not match its recorded sha256")


def test_a_denoiser_of_other_ntm_weights_is_refused(source, tmp_path):
    """Training the NTM further (--resume) leaves a denoiser of the old weights: it is not used silently."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    steps = load_train_state(ckpt)["step"] + 1
    result = runner.invoke(app, ["train", "--dataset", "digits", "--preset", "tiny", "--steps", str(steps),
                                 "--mode", "pairwise", "--pairwise-steps", "4",  # trained_tiny's
                                 "--batch-size", "4", "--out", str(ckpt), "--resume", "--eval-images", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["sample", "--checkpoint", str(ckpt), "--prompt", "3", "--num", "2",
                                 "--final", "denoiser", "--out", str(tmp_path / "s.png")])
    one_error_line(result, "other NTM weights", "train-denoiser")


# -- configs that hash correctly but do not describe a usable model --------------------------------

BAD_CONFIGS = {
    "steps 0": (lambda d: {**d, "steps": 0}, "steps"),
    "steps a string": (lambda d: {**d, "steps": "4"}, "steps"),
    "steps 4.0": (lambda d: {**d, "steps": 4.0}, "steps"),
    "negative image size": (lambda d: {**d, "image_size": -8}, "image_size"),
    "no channels": (lambda d: {**d, "channels": 0}, "channels"),
    "empty predictor channel list": (lambda d: {**d, "predictor": {**d["predictor"], "channels": []}}, "predictor.channels"),
    "zero predictor channel": (lambda d: {**d, "predictor": {**d["predictor"], "channels": [32, 0]}}, "predictor.channels"),
    "negative transporter blocks": (lambda d: {**d, "transporter": {**d["transporter"], "num_blocks": -1}}, "num_blocks"),
    "width not divisible by heads": (lambda d: {**d, "transporter": {**d["transporter"], "heads": 5}}, "heads"),
    "alpha clamp 0": (lambda d: {**d, "transporter": {**d["transporter"], "alpha_clamp": 0.0}}, "alpha_clamp"),
    "t_min_low above t_min_max": (lambda d: {**d, "t_min_low": 0.04, "t_min_max": 0.02}, "t_min_low"),
    "t_min_max past t_1": (lambda d: {**d, "t_min_max": 0.07}, "t_min_max"),
    "t_min_sample 0": (lambda d: {**d, "t_min_sample": 0.0}, "t_min_sample"),
    "t_min_sample past t_1 of a long grid": (lambda d: {**d, "steps": 64}, "t_min"),
    "shift nan": (lambda d: {**d, "shift": math.nan}, "shift"),
    "prompt dropout 2": (lambda d: {**d, "prompt_dropout": 2.0}, "prompt_dropout"),
    "negative x0 weight": (lambda d: {**d, "x0_mse_weight": -1.0}, "x0_mse_weight"),
    "duplicate class names": (lambda d: {**d, "prompt": {**d["prompt"], "class_names": ["a", "A"]}}, "class_names"),
    "empty class name": (lambda d: {**d, "prompt": {**d["prompt"], "class_names": ["a", " "]}}, "class_names"),
    "unknown prompt kind": (lambda d: {**d, "prompt": {**d["prompt"], "kind": "t5"}}, "prompt encoder"),
    "prompt dim 0": (lambda d: {**d, "prompt": {**d["prompt"], "dim": 0}}, "prompt.dim"),
    "learn_scale a number": (lambda d: {**d, "predictor": {**d["predictor"], "learn_scale": 1}}, "learn_scale"),
    "unknown field": (lambda d: {**d, "colour": "blue"}, "colour"),
    "predictor not an object": (lambda d: {**d, "predictor": 5}, "does not describe"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_invalid_config_values_are_named_when_read(case):
    edit, needle = BAD_CONFIGS[case]
    good = get_preset("tiny").with_data(1, tuple("0123456789")).to_dict()
    NTMConfig.from_dict(good)  # the unedited config is valid
    with pytest.raises(ConfigError) as err:
        NTMConfig.from_dict(json.loads(json.dumps(edit(good))))
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_edited_and_resealed_config_is_one_line(source, tmp_path):
    """A config.json edited by hand, with the hash in checkpoint.json updated to match: its values are
    still validated on read (steps 0 would divide by zero deep inside)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    edit_json(ckpt / "config.json", steps=0)
    reseal(ckpt)
    result = runner.invoke(app, ["sample", "--checkpoint", str(ckpt), "--prompt", "3", "--out", str(tmp_path / "s.png")])
    one_error_line(result, "config.json", "steps must be an integer >= 1")


def test_weights_that_do_not_fit_the_config_name_the_tensor_and_both_shapes(source, tmp_path):
    """One more class name than the embedding table has rows: the message names the tensor and both shapes."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["prompt"]["class_names"] = [*cfg["prompt"]["class_names"], "ten"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    reseal(ckpt)
    result = runner.invoke(app, ["sample", "--checkpoint", str(ckpt), "--prompt", "3", "--out", str(tmp_path / "s.png")])
    line = one_error_line(result, "prompt_encoder.embed.weight", "(11, 32)", "(12, 32)")
    assert "model.safetensors" in line


def test_denoiser_config_that_does_not_fit_its_weights(source, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    meta = {k: v for k, v in json.loads((ckpt / "denoiser.json").read_text()).items() if k != "self_sha256"}
    meta["config"] = {**meta["config"], "width": 64, "heads": 2}
    (ckpt / "denoiser.json").write_text(json.dumps(seal(meta)))  # resealed by hand: the shapes still disagree
    with pytest.raises(CheckpointError, match=r"denoiser.safetensors does not fit its config: net.pos has shape \(1, 16, 32\), "
                       r"the config needs \(1, 16, 64\)"):
        load_denoiser(ckpt)
    meta["config"] = {**meta["config"], "steps": 0}
    (ckpt / "denoiser.json").write_text(json.dumps(seal(meta)))
    with pytest.raises(CheckpointError, match="denoiser steps must be an integer >= 1"):
        load_denoiser(ckpt)


def test_presets_stay_valid():
    for name in ("tiny", "small", "base"):
        cfg = get_preset(name).with_data(3, ("cat", "dog"))
        assert NTMConfig.from_dict(cfg.to_dict()) == cfg
        for objective in ("gaussian", "fm"):
            cfg.for_objective(objective).validate()
