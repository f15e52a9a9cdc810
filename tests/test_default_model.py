"""The default model shipped in the package (ntm_edge/assets/default): its hashes, `NTM.from_pretrained
("default")`, the build script, `ntm-edge run` without --bundle (assembled in the cache, torch absent),
and a regression guard on what it draws for "7"."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ntm_edge import assets
from ntm_edge.cli import app
from ntm_edge.errors import CheckpointError, ConfigError, NtmError
from ntm_edge.fileio import sha256_file
from ntm_edge.runtime.bundle import load_bundle

runner = CliRunner()
SHIPPED = assets.ROOT
REPO = Path(__file__).resolve().parents[1]


def quiet(*_):
    pass


# -- the shipped model ---------------------------------------------------------------------------------


def test_shipped_checkpoint_loads_and_matches_its_recorded_hash(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from ntm_edge import NTM
    from ntm_edge.denoiser import has_denoiser, load_denoiser

    index = assets.verify()
    ckpt = SHIPPED / assets.CHECKPOINT
    assert index["files"]["checkpoint/model.safetensors"] == sha256_file(ckpt / "model.safetensors")
    model = NTM.from_pretrained("default")
    weights = load_file(ckpt / "model.safetensors")
    assert model.state_dict().keys() == weights.keys()
    assert all(np.array_equal(model.state_dict()[k].numpy(), v.numpy()) for k, v in weights.items())
    if "checkpoint/denoiser.safetensors" in index["files"]:
        assert has_denoiser("default") and load_denoiser("default").config.steps == model.config.steps
    monkeypatch.chdir(tmp_path)  # a Path("default") is a directory, never the shipped model
    with pytest.raises(CheckpointError, match="does not exist"):
        NTM.from_pretrained(Path("default"))


def test_every_shipped_file_is_package_data():
    """pyproject's package-data patterns cover every file of the default model (a non-editable install
    gets them all)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "ntm_edge.assets" in config["packages"]
    patterns = config["package-data"]["ntm_edge.assets"]
    index = assets.read_index()
    globs = [p.rsplit("/", 1) for p in patterns if "/" in p]  # (folder, name glob): `*` stays inside its folder
    for name in [*index["files"], assets.INDEX, assets.MODEL_CARD]:
        folder, base = f"default/{name}".rsplit("/", 1)
        assert any(folder == d and fnmatch(base, g) for d, g in globs), name


def test_model_card_has_every_section_and_names_a_placeholder():
    card = (SHIPPED / assets.MODEL_CARD).read_text()
    for section in ("## Commands and config", "## Data", "## Training time and hardware", "## Evaluation",
                    "FM-Euler", "## Equal-compute comparison", "## Known limits"):
        assert section in card, section
    if assets.read_index()["placeholder"]:
        assert "PLACEHOLDER" in card


def test_the_word_default_names_the_shipped_model_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid, arr = tmp_path / "s.png", tmp_path / "s.npy"
    r = runner.invoke(app, ["sample", "--checkpoint", "default", "--prompt", "3", "--num", "2", "--final", "inverse",
                            "--out", str(grid), "--save-array", str(arr)])
    assert r.exit_code == 0, r.output
    images = np.load(arr)
    assert images.shape == (2, 28, 28, 1) and images.dtype == np.uint8 and images.std() > 10  # drawn, not blank
    # the shipped model is read-only: a denoiser is never trained into it
    r = runner.invoke(app, ["train-denoiser", "--checkpoint", "default", "--steps", "1"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "the shipped model is read-only" in r.output
    assert assets.verify() is not None
    # a directory named "default" is what the user means when there is one
    (tmp_path / "default").mkdir()
    r = runner.invoke(app, ["sample", "--checkpoint", "default", "--prompt", "3", "--out", str(grid)])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "default" in r.output, r.output


def test_tampering_is_refused_in_one_line(tmp_path, monkeypatch):
    copy = tmp_path / "default"
    shutil.copytree(SHIPPED, copy)
    assert assets.verify(copy) == assets.verify()
    weights = copy / "checkpoint" / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(assets.AssetError) as e:
        assets.checkpoint_dir(copy)
    assert "checkpoint/model.safetensors does not match its recorded sha256" in str(e.value)
    assert "\n" not in str(e.value) and "reinstall ntm-edge" in str(e.value)
    # through the command line: one line, exit status 1, nothing written
    monkeypatch.setattr(assets, "ROOT", copy)
    r = runner.invoke(app, ["run", "--prompt", "7", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert r.output.startswith("error: the default model's checkpoint/model.safetensors does not match")
    assert not (tmp_path / "x.png").exists()
    weights.write_bytes(original)
    index = json.loads((copy / assets.INDEX).read_text())
    index["placeholder"] = not index["placeholder"]  # an edited index, hashes left alone
    (copy / assets.INDEX).write_text(json.dumps(index))
    with pytest.raises(assets.AssetError, match="assets.json does not match its recorded sha256"):
        assets.verify(copy)


# -- the build script and `run` without --bundle, on a label model built here ------------------------------


@pytest.fixture(scope="module")
def label_assets(trained_tiny, tmp_path_factory):
    """(checkpoint, default-model directory) of the session's tiny label model with a short denoiser."""
    from ntm_edge.assets.build import build
    from ntm_edge.denoiser import train_denoiser

    root = tmp_path_factory.mktemp("label_default")
    ckpt = root / "ckpt"
    shutil.copytree(trained_tiny[0], ckpt)
    train_denoiser(ckpt, steps=5, trajectories=1, batch_size=16, progress=False, log=quiet)
    out = root / "default"
    build(ckpt, out, batch=4, log=quiet)
    return ckpt, out


def test_build_writes_the_checkpoint_and_bundle_with_their_hashes(label_assets):
    from ntm_edge import NTM

    ckpt, out = label_assets
    index = assets.verify(out)
    names = set(index["files"])
    assert {"checkpoint/config.json", "checkpoint/model.safetensors", "checkpoint/checkpoint.json",
            "checkpoint/denoiser.safetensors", "checkpoint/denoiser.json", "bundle/manifest.json",
            "bundle/denoiser.fp32.onnx", "bundle/prompt_encoder.fp32.onnx"} <= names
    assert not any("train_state" in n for n in names)  # optimizer state is not shipped
    assert index["assemble"] == {} and index["placeholder"] is False  # a label model ships its whole bundle
    assert (out / "bundle" / "model.safetensors").exists() is False
    assert sha256_file(out / "checkpoint" / "model.safetensors") == sha256_file(ckpt / "model.safetensors")
    a, b = NTM.from_pretrained(out / "checkpoint").state_dict(), NTM.from_pretrained(ckpt).state_dict()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert (out / assets.MODEL_CARD).read_text() == (REPO / "ntm_edge/assets/MODEL_CARD.template.md").read_text()


def test_build_replaces_only_a_directory_of_its_own_kind(label_assets, tmp_path, capsys):
    from ntm_edge.assets.build import check_out, main

    ckpt, out = label_assets
    check_out(out, ckpt)  # an earlier build: may be replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["--checkpoint", str(ckpt), "--out", str(foreign)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "is not a default-model directory" in err and err.count("\n") == 1
    assert (foreign / "notes.txt").read_text() == "mine"
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    (mixed / "checkpoint" / "extra.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="no earlier build wrote"):
        check_out(mixed, ckpt)
    with pytest.raises(ConfigError, match="overlap"):
        check_out(ckpt / "default", ckpt)


def test_rebuild_keeps_the_model_card_and_ships_a_given_export(label_assets, trained_tiny, tmp_path):
    from ntm_edge.assets.build import build
    from ntm_edge.export import export_bundle

    ckpt, out = label_assets
    exported = tmp_path / "exported"
    export_bundle(ckpt, exported, batch=4, log=quiet)
    with pytest.raises(ConfigError, match="holds a denoiser that --checkpoint .* does not hold"):
        build(trained_tiny[0], tmp_path / "other", bundle=exported, log=quiet)  # the same NTM, without the denoiser
    again = tmp_path / "default"
    shutil.copytree(out, again)
    (again / assets.MODEL_CARD).write_text("# filled in by hand\n")
    index = build(ckpt, again, placeholder=True, bundle=exported, log=quiet)
    assert (again / assets.MODEL_CARD).read_text() == "# filled in by hand\n"
    assert index["placeholder"] is True and assets.verify(again) == index
    assert index["files"]["bundle/weights.bin"] == assets.verify(out)["files"]["bundle/weights.bin"]  # same tensors
    build(ckpt, again, bundle=exported, log=quiet)  # the real model replaces the placeholder: a fresh card
    template = (REPO / "ntm_edge/assets/MODEL_CARD.template.md").read_text()
    assert (again / assets.MODEL_CARD).read_text() == template
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default", "exported"]  # no temporaries left


FORBID_TORCH = r"""
import sys

class Forbidden:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"the runtime must not import {name}")

sys.meta_path.insert(0, Forbidden())
"""

RUN_DEFAULT = FORBID_TORCH + r"""
from pathlib import Path
import ntm_edge.assets
from ntm_edge.cli import app

root, out, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
if root != "shipped":
    ntm_edge.assets.ROOT = Path(root)  # the default model of this test instead of the shipped one
for i in range(2):  # the first run assembles the bundle, the second reuses it
    print(f"--- run {i}", flush=True)
    try:
        app(["run", "--prompt", prompt, "--num", "3", "--threads", "1", "--out", f"{out}{i}.png",
             "--save-array", f"{out}{i}.npy"])
    except SystemExit as e:
        assert e.code in (0, None), e.code
assert "torch" not in sys.modules and "transformers" not in sys.modules
print("NO TORCH OK")
"""


def _run_default(root, out: Path, prompt: str, cache: Path) -> tuple[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NTM_EDGE_CACHE": str(cache)}
    r = subprocess.run([sys.executable, "-c", RUN_DEFAULT, str(root), str(out), prompt], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and "NO TORCH OK" in r.stdout, r.stdout + r.stderr
    first, second = r.stdout.split("--- run 1")
    return first, second


def test_run_without_bundle_assembles_once_in_the_cache_without_torch(label_assets, tmp_path):
    from ntm_edge.exits import sample_images
    from ntm_edge.runtime.default_model import cache_dir

    _, out = label_assets
    cache = tmp_path / "cache"
    first, second = _run_default(out, tmp_path / "s", "seven", cache)
    assert "first use of the default model: assembling its bundle" in first and "assembling" not in second
    (bundle,) = (cache / "bundles").iterdir()
    index = assets.verify(out)
    assert bundle.name == f"default-{assets.asset_key(index)[:16]}"
    assert load_bundle(bundle).manifest["assembled"]["from"].endswith(f"({assets.asset_key(index)})")
    a, b = np.load(tmp_path / "s0.npy"), np.load(tmp_path / "s1.npy")
    np.testing.assert_array_equal(a, b)
    # the images of the shipped checkpoint under torch, same seed and exit (the denoiser)
    from ntm_edge import NTM
    from ntm_edge.denoiser import load_denoiser

    model, den = NTM.from_pretrained(out / "checkpoint"), load_denoiser(out / "checkpoint")
    want = sample_images(model, ["seven"] * 3, seed=0, final="denoiser", denoiser=den)
    assert np.abs(a.astype(int) - want).max() <= 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NTM_EDGE_CACHE", str(cache))
        assert cache_dir(index) == bundle


def test_a_damaged_cached_bundle_is_assembled_again(label_assets, tmp_path, monkeypatch):
    from ntm_edge.runtime.default_model import cache_dir, default_bundle

    _, out = label_assets
    monkeypatch.setenv("NTM_EDGE_CACHE", str(tmp_path / "cache"))
    log: list[str] = []
    bundle = default_bundle(out, log=log.append)
    graph = bundle / "predictor_step.fp32.onnx"
    graph.write_bytes(graph.read_bytes()[:100])
    assert default_bundle(out, log=log.append) == bundle
    assert len(log) == 2 and "first use" in log[0] and "is unusable" in log[1] and "assembling it again" in log[1]
    load_bundle(bundle)  # whole again
    assert [p.name for p in bundle.parent.iterdir()] == [bundle.name]  # no temporaries left
    assert cache_dir(assets.verify(out)) == bundle


def test_a_foreign_directory_in_the_cache_is_never_replaced(label_assets, tmp_path, monkeypatch):
    from ntm_edge.runtime.default_model import cache_dir, default_bundle

    _, out = label_assets
    monkeypatch.setenv("NTM_EDGE_CACHE", str(tmp_path / "cache"))
    target = cache_dir(assets.verify(out))
    target.mkdir(parents=True)
    (target / "mine.txt").write_text("keep")
    with pytest.raises(NtmError, match="is not an ntm-edge bundle; move it away"):
        default_bundle(out, log=quiet)
    assert (target / "mine.txt").read_text() == "keep"


# -- the shipped (text) model on the runtime ---------------------------------------------------------------


def test_shipped_model_runs_without_bundle_and_without_torch(tmp_path):
    first, second = _run_default("shipped", tmp_path / "s", "a handwritten seven", tmp_path / "cache")
    assert "first use of the default model" in first and "assembling" not in second
    assert "wrote" in second and "pipeline" in second  # the latency table
    images = np.load(tmp_path / "s1.npy")
    np.testing.assert_array_equal(images, np.load(tmp_path / "s0.npy"))
    (bundle,) = (tmp_path / "cache" / "bundles").iterdir()
    assert set(load_bundle(bundle).manifest["assembled"]["added"]) == set(assets.read_index()["assemble"])


# -- regression guard ------------------------------------------------------------------------------------

GUARD_SAMPLES, GUARD_SHARE = 32, 0.6


def test_sevens_are_read_as_seven():
    """Most samples of the shipped model for "a handwritten seven" are 7s to the evaluation classifier
    (the exit `ntm-edge run` takes: the bundle's denoiser if it has one, else the inverse). Generous: the
    model card reports the prompt accuracy itself."""
    index = assets.verify()
    if index["placeholder"]:
        pytest.skip("the shipped default model is a placeholder (a quick stand-in); the guard applies to the real model")
    from ntm_edge import NTM
    from ntm_edge.checkpoint import trained_on
    from ntm_edge.denoiser import load_denoiser
    from ntm_edge.exits import sample_images
    from ntm_edge.metrics import classifier_predict, load_or_train_classifier

    model = NTM.from_pretrained("default")
    bundle_graphs = json.loads((SHIPPED / assets.BUNDLE / "manifest.json").read_text())["graphs"]
    final = "denoiser" if "denoiser" in bundle_graphs else "inverse"
    den = load_denoiser("default") if final == "denoiser" else None
    images = sample_images(model, ["a handwritten seven"] * GUARD_SAMPLES, seed=0, final=final, denoiser=den)
    cfg = model.config
    clf = load_or_train_classifier(trained_on(SHIPPED / assets.CHECKPOINT), cfg.image_size, cfg.channels, log=quiet)
    share = float(np.mean(classifier_predict(clf, images) == clf.class_names.index("7")))
    assert share >= GUARD_SHARE, f"only {share:.0%} of the samples for 'a handwritten seven' are read as 7"


def test_demo_reports_a_bad_bundle_in_one_line(tmp_path, capsys):
    """`python -m ntm_edge.runtime.demo` (what `make demo` runs) with a directory that is no bundle, whose name
    holds a newline: exit status 1, one escaped line on stderr, no image written."""
    from ntm_edge.runtime.demo import main

    bad = tmp_path / "not\na bundle"
    bad.mkdir()
    assert main(["--bundle", str(bad), "--out", str(tmp_path / "demo.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "not\\na bundle" in err, err
    assert not (tmp_path / "demo.png").exists()
