"""The command line, end to end through typer's CliRunner and real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ntm_edge.cli import app

runner = CliRunner()
COMMANDS = ["train", "sample", "train-denoiser", "eval", "compare", "export", "run", "audit", "presets", "bench"]


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_help(command):
    result = runner.invoke(app, command + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_sample_writes_grid_and_array(trained_tiny, tmp_path):
    ckpt, _ = trained_tiny
    png, npy = tmp_path / "grid.png", tmp_path / "x.npy"
    result = runner.invoke(app, ["sample", "--checkpoint", str(ckpt), "--prompt", "seven", "--num", "6",
                                 "--seed", "2", "--guidance", "1.5", "--out", str(png), "--save-array", str(npy)])
    assert result.exit_code == 0, result.output
    arr = np.load(npy)
    assert arr.shape == (6, 8, 8, 1) and arr.dtype == np.uint8
    assert arr.std() > 0
    assert Image.open(png).size[0] >= 3 * 8 * 8  # 3 columns of cells scaled to >= 64 px


def test_unknown_prompt_is_one_line_error(trained_tiny, tmp_path):
    ckpt, _ = trained_tiny
    result = runner.invoke(app, ["sample", "--checkpoint", str(ckpt), "--prompt", "giraffe",
                                 "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown prompt 'giraffe'"), result.output
    assert "'0'" in lines[0] and "'9'" in lines[0]
    assert not (tmp_path / "g.png").exists()


def test_missing_checkpoint_is_one_line_error(tmp_path):
    result = runner.invoke(app, ["sample", "--checkpoint", str(tmp_path / "nope"), "--prompt", "1"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: checkpoint directory") and result.output.count("\n") == 1


def test_train_cli(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--preset", "tiny", "--steps", "3", "--batch-size", "8",
            "--out", str(out), "--eval-images", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "checkpoint.json", "train_state.pt"} <= {p.name for p in out.iterdir()}
    again = runner.invoke(app, args)  # never overwrites
    assert again.exit_code == 1 and "already holds a checkpoint" in again.output
    resumed = runner.invoke(app, args[:6] + ["6"] + args[7:] + ["--resume"])
    assert resumed.exit_code == 0, resumed.output


def test_unknown_dataset_and_preset(tmp_path):
    r = runner.invoke(app, ["train", "--dataset", "cifar", "--out", str(tmp_path / "a")])
    assert r.exit_code == 1 and "digits" in r.output and "mnist5k" in r.output
    r = runner.invoke(app, ["train", "--preset", "huge", "--out", str(tmp_path / "b")])
    assert r.exit_code == 1 and "tiny, small, base" in r.output


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())


def test_import_does_not_pull_torch():
    r = _python("import sys, ntm_edge, ntm_edge.cli, ntm_edge.schedule, ntm_edge.prompts, ntm_edge.runtime;"
                "assert 'torch' not in sys.modules, 'torch imported'")
    assert r.returncode == 0, r.stderr


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "ntm_edge", "presets"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "tiny" in r.stdout and "small" in r.stdout
