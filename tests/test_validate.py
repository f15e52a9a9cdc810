"""ntm_edge.validate: the option checks every command shares (torch-free, no model needed)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntm_edge import schedule, validate
from ntm_edge.errors import ConfigError


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(t_min=st.floats(1e-4, 0.5), shift=st.floats(-2.0, 3.0))
def test_max_steps_is_exactly_the_limit_of_the_time_grid(t_min, shift):
    """The documented limit is the last T whose grid exists: time_grid works at it and raises past it."""
    limit = validate.max_steps(t_min, shift)
    if limit >= 1:
        schedule.time_grid(limit, t_min, shift)
    with pytest.raises(ValueError):
        schedule.time_grid(limit + 1, t_min, shift)


def test_step_limit_at_the_sampler_defaults():
    assert validate.max_steps(0.025) == 39  # unshifted: T < 1 / t_min
    assert validate.steps(39, 0.025) == 39
    with pytest.raises(ConfigError, match=r"--steps 40 .* T <= 39"):
        validate.steps(40, 0.025)
    with pytest.raises(ConfigError, match="at least 1"):
        validate.steps(0, 0.025)
    assert validate.max_steps(0.025, 0.3) > 39  # a shift towards noise leaves room for more steps


@pytest.mark.parametrize("w", [math.nan, math.inf, -math.inf, -1.0, -1e-9])
def test_guidance_must_be_finite_and_non_negative(w):
    with pytest.raises(ConfigError, match="--guidance must be a finite number >= 0"):
        validate.guidance(w)


@pytest.mark.parametrize("lr", [math.nan, math.inf, 0.0, -1e-3])
def test_learning_rate(lr):
    with pytest.raises(ConfigError, match="--lr must be a finite number > 0"):
        validate.learning_rate(lr)
    assert validate.learning_rate(1e-3) == 1e-3


def test_seed_range():
    assert validate.seed(0) == 0 and validate.seed(2**63 - 1) == 2**63 - 1
    for bad in (-1, 2**63, 2**64):
        with pytest.raises(ConfigError, match=r"--seed must lie in \[0, 2\^63\)"):
            validate.seed(bad)


def test_threads():
    cores = validate.cpu_count()
    warnings = []
    assert validate.threads(None) is None and validate.threads(0) == 0
    assert validate.threads(-1) == cores
    assert validate.threads(1, warn=warnings.append) == 1 and not warnings
    assert validate.threads(100_000, warn=warnings.append) == cores
    assert len(warnings) == 1 and f"using {cores}" in warnings[0]
    with pytest.raises(ConfigError, match="--threads must be -1"):
        validate.threads(-2)


def test_runtime_threads_follow_the_same_rules(monkeypatch):
    from ntm_edge.runtime import session

    cores = validate.cpu_count()
    monkeypatch.setenv("OMP_NUM_THREADS", "100000")
    assert session.default_threads() == cores  # the environment is bounded too
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert session.default_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert session.default_threads() is None


@pytest.mark.parametrize("name", ["tpu", "mps", "cuda:x", "cpu:0", "gpu", "", "cuda:-1"])
def test_unknown_devices(name):
    with pytest.raises(ConfigError, match="choose one of: cpu, cuda, cuda:N"):
        validate.device(name)


def test_devices_against_what_torch_sees():
    assert validate.device("CPU") == "cpu" and validate.device("cuda:1", cuda_devices=2) == "cuda:1"
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        validate.device("cuda", cuda_devices=0)
    with pytest.raises(ConfigError, match="has 1 CUDA device"):
        validate.device("cuda:1", cuda_devices=1)


def test_opset_range():
    assert validate.opset(17, 14, 23) == 17
    with pytest.raises(ConfigError, match=r"--opset must lie in \[14, 23\]"):
        validate.opset(28, 14, 23)


def test_output_paths(tmp_path):
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "file").write_text("x")
    assert validate.image_path(tmp_path / "new" / "deeper" / "a.JPG").name == "a.JPG"
    assert validate.image_format(tmp_path / "a.JPG") == "JPEG" and validate.image_format("x.webp") == "WEBP"
    cases = [(validate.image_path, tmp_path / "dir.png", "is a directory"),
             (validate.image_path, tmp_path / "a.txt", "must end in .png, .jpg, .jpeg, .webp, .bmp"),
             (validate.image_path, tmp_path / "a", "must end in"),
             (validate.image_path, tmp_path / "file" / "a.png", "is not a directory"),
             (validate.array_path, tmp_path / "a.png", "must end in .npy"),
             (validate.array_path, tmp_path, "is a directory")]
    for check, path, message in cases:
        with pytest.raises(ConfigError, match=message):
            check(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_directory_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="is not writable"):
            validate.image_path(ro / "a.png")
    finally:
        ro.chmod(0o755)


def test_memory_check():
    validate.fits_in_memory(1024, "a small request")
    if validate.available_memory() is not None:
        with pytest.raises(ConfigError, match=r"--num 1e15 needs at least .* of memory; .* is available"):
            validate.fits_in_memory(1e18, "--num 1e15")


def test_exit_for_steps():
    warnings = []
    assert validate.exit_for_steps(None, 8, None) == "inverse"
    assert validate.exit_for_steps(None, 4, 4) == "denoiser"
    assert validate.exit_for_steps("inverse+score", 8, 4) == "inverse+score"
    assert validate.exit_for_steps(None, 8, 4, warnings.append) == "inverse"
    assert len(warnings) == 1 and "trained for --steps 4" in warnings[0]
    with pytest.raises(ConfigError, match="the denoiser was trained for --steps 4, not 8"):
        validate.exit_for_steps("denoiser", 8, 4)


def test_validate_does_not_import_torch_or_numpy():
    code = "import sys, ntm_edge.validate; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
