"""Issue 9, CLI side: every fault and bad input of the issue, through the real CLI (typer's CliRunner)
on the tiny exported model of test_export (a T = 4 checkpoint with a denoiser, and its bundle).

Each case checks what the user sees (exit status 0, or 1 with one `error:` line, never a
traceback) and what is left on disk (no partial output; the checkpoint and bundle untouched)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from cli_checks import flat_help, lines, no_traceback, one_line_error, temporaries, tree_digest
from PIL import Image
from test_export import make_tiny_bundle
from typer.testing import CliRunner

from ntm_edge import validate
from ntm_edge.cli import app
from ntm_edge.images import MAX_GRID_PIXELS, save_images
from ntm_edge.runtime.bundle import MANIFEST

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt, bundle, _ = make_tiny_bundle(tmp_path_factory)
    before = tree_digest(ckpt), tree_digest(bundle)
    yield ckpt, bundle
    assert (tree_digest(ckpt), tree_digest(bundle)) == before, "a test changed the shared checkpoint or bundle"


def sample(ckpt, tmp_path, *extra):
    return runner.invoke(app, ["sample", "--checkpoint", str(ckpt), "--prompt", "3", "--num", "3",
                               "--out", str(tmp_path / "s.png"), *extra])


def run(bundle, tmp_path, *extra):
    return runner.invoke(app, ["run", "--bundle", str(bundle), "--prompt", "3", "--num", "3",
                               "--out", str(tmp_path / "r.png"), *extra])


def audit(bundle, image, *extra):
    return runner.invoke(app, ["audit", "--bundle", str(bundle), "--prompt", "3", "--image", str(image), *extra])


def export(ckpt, out, *extra):
    return runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--out", str(out), "--no-parity", *extra])


# -------------------------------------------------------------------------------------------------
# data loss: export --overwrite
# -------------------------------------------------------------------------------------------------


def test_export_never_replaces_the_checkpoint(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny[0], ckpt)
    before = tree_digest(ckpt)
    for out in (ckpt, ckpt / "bundle", tmp_path):  # the checkpoint, inside it, around it
        one_line_error(export(ckpt, out, "--overwrite"), "overlap")
    assert tree_digest(ckpt) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_export_overwrites_only_a_bundle_of_its_own_files(tiny, tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.txt").write_text("precious")
    one_line_error(export(tiny[0], user, "--overwrite"), "is not an ntm-edge bundle")
    a_file = tmp_path / "a_file"
    a_file.write_text("precious")
    one_line_error(export(tiny[0], a_file, "--overwrite"), "is not a directory")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny[1], bundle)
    (bundle / "notes.txt").write_text("mine")
    one_line_error(export(tiny[0], bundle, "--overwrite"), "'notes.txt'")
    assert (user / "thesis.txt").read_text() == "precious" and a_file.read_text() == "precious"
    assert (bundle / "notes.txt").read_text() == "mine" and tree_digest(bundle / MANIFEST) == tree_digest(tiny[1] / MANIFEST)


def test_export_removes_what_a_killed_export_left(tiny, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid no longer runs
    stale = tmp_path / f".bundle.{dead.pid}.abcd1234.tmp"
    stale.mkdir()
    (stale / "predictor_step.fp32.onnx").write_bytes(b"x" * 1000)
    other = tmp_path / f".other.{dead.pid}.abcd1234.tmp"  # another target's: not ours to remove here
    other.write_text("x")
    r = export(tiny[0], tmp_path / "bundle", "--opset", "9")  # refused: nothing is removed before the checks pass
    one_line_error(r, "--opset must lie in [14, 23]")
    assert stale.exists()
    r = export(tiny[0], tmp_path / "bundle")
    assert r.exit_code == 0, r.output
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "bundle"]


def test_sample_and_run_remove_what_a_killed_write_left(tiny, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    for name in ("s.png", "r.png", "a.npy"):
        (tmp_path / f".{name}.{dead.pid}.k9x2ab.tmp").write_bytes(b"half an image")
    assert sample(tiny[0], tmp_path).exit_code == 0
    assert run(tiny[1], tmp_path, "--save-array", str(tmp_path / "a.npy")).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "r.png", "s.png"]


def test_export_opset_range_is_what_the_exporter_supports(tiny, tmp_path):
    import onnx
    import torch

    from ntm_edge.export.writer import supported_opsets

    low, high = supported_opsets()
    assert high == min(torch.onnx._constants.ONNX_MAX_OPSET, onnx.defs.onnx_opset_version())
    line = one_line_error(export(tiny[0], tmp_path / "b", "--opset", str(high + 1)))
    assert f"[{low}, {high}]" in line  # the range offered is the range that works
    one_line_error(export(tiny[0], tmp_path / "b", "--batch", "0"), "--batch must be at least 1")
    one_line_error(export(tiny[0], tmp_path / "b", "--batch", str(10**15)), "of memory")
    assert not (tmp_path / "b").exists() and not temporaries(tmp_path)


# -------------------------------------------------------------------------------------------------
# silently wrong output
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [*(("--guidance", w) for w in ("nan", "inf", "-inf", "-1")),
                                           *(("--temperature", tau) for tau in ("nan", "inf", "-0.5"))])
def test_sampling_options_must_be_finite_everywhere(tiny, tmp_path, option, value):
    message = f"{option} must be a finite number >= 0"
    one_line_error(sample(tiny[0], tmp_path, option, value), message)
    one_line_error(run(tiny[1], tmp_path, option, value), message)
    r = runner.invoke(app, ["eval", "--checkpoint", str(tiny[0]), option, value, "--out", str(tmp_path / "e.json")])
    one_line_error(r, message)
    assert not list(tmp_path.iterdir())


def test_temperature_zero_draws_the_same_images_for_every_seed(tiny, tmp_path):
    """tau = 0 scales every draw to zero: the sampler follows its chain of means, so the seed no longer
    matters, in `sample` and `run` alike; at tau = 1 two seeds differ."""
    arrays = {}
    for tool, target in (("sample", tiny[0]), ("run", tiny[1])):
        for seed in ("1", "2"):
            for tau in ("0", "1"):
                path = tmp_path / f"{tool}-{seed}-{tau}.npy"
                r = (sample if tool == "sample" else run)(target, tmp_path, "--seed", seed, "--temperature", tau,
                                                          "--final", "inverse", "--save-array", str(path))
                assert r.exit_code == 0, r.output
                arrays[tool, seed, tau] = np.load(path)
    for tool in ("sample", "run"):
        assert np.array_equal(arrays[tool, "1", "0"], arrays[tool, "2", "0"])
        assert not np.array_equal(arrays[tool, "1", "1"], arrays[tool, "2", "1"])
    assert np.abs(arrays["sample", "1", "0"].astype(int) - arrays["run", "1", "0"]).max() <= 1


def test_overflowing_guidance_is_an_error_not_black_images(tiny, tmp_path):
    """A finite but huge w overflows float32 in the guided mean: both samplers say so instead of writing
    black images (NaN -> 0)."""
    one_line_error(sample(tiny[0], tmp_path, "--guidance", "1e30", "--final", "inverse"), "NaN or inf")
    one_line_error(run(tiny[1], tmp_path, "--guidance", "1e30", "--final", "inverse"), "NaN or inf")
    assert not list(tmp_path.iterdir())


def test_audit_input_errors(tiny, tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 8, 8, 1), np.uint8))
    (tmp_path / "zero.npy").write_bytes(b"")
    np.save(tmp_path / "two.npy", np.full((2, 8, 8, 1), 100, np.uint8))
    one_line_error(audit(tiny[1], tmp_path / "empty.npy"), "holds no images")
    one_line_error(audit(tiny[1], tmp_path / "zero.npy"), "is not a readable .npy array")
    one_line_error(audit(tiny[1], tmp_path / "two.npy", "--steps", "0"), "--steps must be at least 1")
    one_line_error(audit(tiny[1], tmp_path, "--steps", "4"), "is a directory")
    a = audit(tiny[1], tmp_path / "two.npy")
    b = audit(tiny[1], tmp_path / "two.npy", "--steps", "4")  # the model's T, given explicitly
    assert a.exit_code == b.exit_code == 0 and a.stdout == b.stdout and "T = 4" in a.stdout


def test_audit_hostile_files(tiny, tmp_path):
    """A .npy header that promises 640 GB, an image past Pillow's size limit, a device file."""
    from numpy.lib import format as npy_format

    with open(tmp_path / "huge.npy", "wb") as f:
        npy_format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (10**10, 8, 8, 1)})
        f.write(bytes(100))
    one_line_error(audit(tiny[1], tmp_path / "huge.npy"), "is not a readable .npy array")
    Image.new("L", (10_000, 10_000)).save(tmp_path / "bomb.png")
    one_line_error(audit(tiny[1], tmp_path / "bomb.png"), "exceeds limit")
    one_line_error(audit(tiny[1], "/dev/zero"), "is not a regular file")


def test_an_error_is_one_line_even_for_a_path_with_a_newline(tiny, tmp_path):
    line = one_line_error(run(tiny[1], tmp_path, "--out", str(tmp_path / "a\nb" / "x.txt")), "must end in .png")
    assert "a\\nb" in line


def test_denoiser_is_used_only_at_its_step_count(tiny, tmp_path):
    """The denoiser was trained for T = 4: --final denoiser at T = 8 is refused; by default, T = 8 leaves
    u-space by the exact inverse with a warning (and a second one: the model itself was trained at T = 4)."""
    one_line_error(sample(tiny[0], tmp_path, "--steps", "8", "--final", "denoiser"), "trained for --steps 4, not 8")
    one_line_error(run(tiny[1], tmp_path, "--steps", "8", "--final", "denoiser"), "trained for --steps 4, not 8")
    for r in (sample(tiny[0], tmp_path, "--steps", "8"), run(tiny[1], tmp_path, "--steps", "8")):
        no_traceback(r)
        assert r.exit_code == 0 and "exit inverse" in r.stdout
        assert lines(r.stderr) == ["warning: the denoiser was trained for --steps 4; at --steps 8 the images leave "
                                   "u-space by the exact inverse instead (--final inverse)",
                                   "warning: this model was trained at --steps 4 only; at --steps 8 it runs on a grid "
                                   "it never saw, and its images and bits/dim can be much worse (train with 8 among "
                                   "the step counts to use it)"]
    for r in (sample(tiny[0], tmp_path), run(tiny[1], tmp_path)):  # at its own T: the default, no warning
        assert r.exit_code == 0 and "exit denoiser" in r.stdout and not r.stderr


@pytest.mark.parametrize("suffix, fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".JPEG", "JPEG"), (".webp", "WEBP"),
                                         (".bmp", "BMP")])
def test_grid_is_written_in_the_format_its_suffix_names(tiny, tmp_path, suffix, fmt):
    r = run(tiny[1], tmp_path, "--out", str(tmp_path / f"grid{suffix}"))
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / f"grid{suffix}") as img:
        assert img.format == fmt


# -------------------------------------------------------------------------------------------------
# one line where a traceback was: steps, devices, learning rates, output paths
# -------------------------------------------------------------------------------------------------


def test_step_limit_is_exact_and_stated(tiny, tmp_path):
    limit = validate.max_steps(0.025)
    assert limit == 39
    for r in (sample(tiny[0], tmp_path, "--steps", "40"), run(tiny[1], tmp_path, "--steps", "40"),
              audit(tiny[1], tmp_path / "none.npy", "--steps", "40"),
              runner.invoke(app, ["eval", "--checkpoint", str(tiny[0]), "--steps", "1000", "--out", str(tmp_path / "e.json")])):
        one_line_error(r, "T <= 39")
    r = run(tiny[1], tmp_path, "--steps", "39", "--final", "inverse", "--num", "1")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("device, message", [("tpu", "unknown --device 'tpu'"), ("cuda:x", "unknown --device"),
                                             ("cuda", "sees no CUDA device")])
def test_devices(tiny, tmp_path, device, message):
    import torch

    if torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has CUDA")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny[0], ckpt)
    before = tree_digest(ckpt)
    for args in (["sample", "--checkpoint", str(ckpt), "--prompt", "3", "--out", str(tmp_path / "s.png")],
                 ["eval", "--checkpoint", str(ckpt), "--out", str(tmp_path / "e.json")],
                 ["train", "--steps", "2", "--out", str(tmp_path / "t")],
                 ["train-denoiser", "--checkpoint", str(ckpt), "--steps", "2"]):
        one_line_error(runner.invoke(app, [*args, "--device", device]), message)
    assert tree_digest(ckpt) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("lr", ["nan", "inf", "0", "-1"])
def test_learning_rates(tiny, tmp_path, lr):
    r = runner.invoke(app, ["train", "--lr", lr, "--steps", "2", "--out", str(tmp_path / "t")])
    one_line_error(r, "--lr must be a finite number > 0")
    r = runner.invoke(app, ["train-denoiser", "--checkpoint", str(tiny[0]), "--lr", lr, "--steps", "2"])
    one_line_error(r, "--lr must be a finite number > 0")
    assert not (tmp_path / "t").exists()


def test_output_paths_are_checked_before_any_work(tiny, tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    png, npy = str(tmp_path / "ok.png"), str(tmp_path / "ok.npy")
    cases = [(["--out", str(tmp_path / "dir")], "is a directory"),
             (["--out", png, "--save-array", str(tmp_path / "dir")], "is a directory"),  # the PNG must not appear
             (["--out", str(tmp_path / "x.txt")], "must end in .png"),
             (["--out", png, "--save-array", str(tmp_path / "x.png")], "must end in .npy"),
             (["--out", str(tmp_path / "file" / "x.png")], "not a directory"),
             (["--out", png, "--save-array", str(tmp_path / "file" / "x.npy")], "not a directory"),
             (["--out", png, "--save-array", "/sys/x.npy"], "cannot write in /sys")]  # unwritable, even for root
    for extra, message in cases:
        one_line_error(sample(tiny[0], tmp_path, *extra), message)
        one_line_error(run(tiny[1], tmp_path, *extra), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"] and not list((tmp_path / "dir").iterdir())
    r = run(tiny[1], tmp_path, "--out", str(tmp_path / "new" / "deep" / "ok.png"), "--save-array", npy)
    assert r.exit_code == 0 and np.load(npy).shape == (3, 8, 8, 1)


def test_eval_report_path_is_checked_before_the_work(tiny, tmp_path):
    r = runner.invoke(app, ["eval", "--checkpoint", str(tiny[0]), "--out", str(tmp_path)])
    one_line_error(r, "is a directory")
    r = runner.invoke(app, ["eval", "--checkpoint", str(tiny[0]), "--num-samples", "1", "--out", str(tmp_path / "e.json")])
    one_line_error(r, "--num-samples must be at least 2")


@pytest.mark.parametrize("value", ["-1", "18446744073709551616"])
def test_seeds(tiny, tmp_path, value):
    one_line_error(sample(tiny[0], tmp_path, "--seed", value), "--seed must lie in [0, 2^63)")
    one_line_error(run(tiny[1], tmp_path, "--seed", value), "--seed must lie in [0, 2^63)")


# -------------------------------------------------------------------------------------------------
# resources
# -------------------------------------------------------------------------------------------------


def test_threads_are_bounded_by_the_cores(tiny, tmp_path):
    cores = validate.cpu_count()
    r = run(tiny[1], tmp_path, "--threads", "100000")
    assert r.exit_code == 0, r.output
    assert lines(r.stderr) == [f"warning: --threads 100000 is more than the {cores} cores this process may use; "
                               f"using {cores}"]
    for value in ("0", "-1", "1"):
        r = run(tiny[1], tmp_path, "--threads", value)
        assert r.exit_code == 0 and not r.stderr, r.output
    one_line_error(run(tiny[1], tmp_path, "--threads", "-2"), "--threads must be -1 (all cores), 0")
    help_text = flat_help(runner.invoke(app, ["run", "--help"]).output)
    assert "0: onnxruntime's choice" in help_text and "-1: every core" in help_text


def test_absurd_requests_are_refused_up_front(tiny, tmp_path):
    one_line_error(run(tiny[1], tmp_path, "--num", str(10**13)), "of memory")
    one_line_error(sample(tiny[0], tmp_path, "--num", str(10**16)), "of memory")
    assert not list(tmp_path.iterdir())


def test_a_huge_grid_is_capped_and_the_array_keeps_every_image(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (100_000, 8, 8, 1), dtype=np.uint8)
    log = []
    save_images(images, tmp_path / "grid.png", tmp_path / "all.npy", log.append)
    with Image.open(tmp_path / "grid.png") as grid:  # Pillow opens it (no decompression-bomb error)
        assert grid.size[0] * grid.size[1] <= MAX_GRID_PIXELS
        cells = (grid.size[0] // 65) * (grid.size[1] // 65)  # 8 px scaled x8, plus 1 px padding
    shown = int(log[0].split("shows the first ")[1].split()[0])
    assert shown < len(images) and cells >= shown and "all 100000 are in" in log[0]
    np.testing.assert_array_equal(np.load(tmp_path / "all.npy"), images)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grid.png"))[1:65, 1:65],
                                  images[0, :, :, 0].repeat(8, 0).repeat(8, 1))


# -------------------------------------------------------------------------------------------------
# docs
# -------------------------------------------------------------------------------------------------


def test_design_notes_are_in_the_repository_and_cited_correctly():
    """The README, help strings and code cite docs/design.md, and each cited section exists there."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    design = (root / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", design, re.M)) | set(re.findall(r"\*\*(\d+[a-z])\.", design))
    cited, stale = set(), []
    for path in [root / "README.md", *root.glob("*/**/*.py")]:
        # this file names what it looks for
        if ".venv" in path.parts or path == Path(__file__).resolve():
            continue
        text = path.read_text()
        cited |= set(re.findall(r"docs/design\.md (\d+[a-z]?)", text))
        stale += [str(path)] if "DESIGN.md" in text or "STYLE" in text else []
    assert not stale and cited and cited <= sections, (stale, cited - sections)
    help_text = flat_help(runner.invoke(app, ["audit", "--help"]).output)
    assert "docs/design.md 4" in help_text and "DESIGN" not in help_text
