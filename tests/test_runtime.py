"""The torch-free runtime: `ntm-edge run` and `ntm-edge audit` on an exported bundle.

1. Same seed, same images as the torch sampler (`ntm-edge sample`): every exit (inverse by Jacobi or
   sequential decoding, denoiser), with and without guidance, one graph per step or the unrolled loop,
   across engine batches and noise chunks: images within 1 uint8 level, u levels within 1e-4.
   GS-Jacobi on the runtime (per-block segments and caps) equals sequential decoding.
2. The runtime never imports torch (a subprocess that forbids it runs every command path).
3. The audit: the exact trajectory NLL equals the torch model's; held-out digits score far fewer
   bits/dim than uniform noise.
4. A modified, truncated or re-versioned bundle is one clear error line; so are bad options.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_export import make_tiny_bundle
from typer.testing import CliRunner

from ntm_edge.cli import app
from ntm_edge.errors import ConfigError, PromptError
from ntm_edge.runtime import BundleError, open_runtime
from ntm_edge.runtime.bundle import FORMAT_VERSION, MANIFEST, seal
from ntm_edge.runtime.sampler import generate
from ntm_edge.sampling import NOISE_BATCH

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def model(tiny_bundle):
    from ntm_edge import NTM

    return NTM.from_pretrained(tiny_bundle[0])


@pytest.fixture(scope="module")
def rt(tiny_bundle):
    return open_runtime(tiny_bundle[1], provider="cpu", threads=1)


@pytest.mark.parametrize("segments", [1, 2, (4, 2)], ids=["jacobi", "gs2", "gs4-2"])
def test_runtime_gs_jacobi_matches_sequential_decoding(model, rt, segments):
    """GS-Jacobi on the runtime, driven by the transporter's per-block settings: the exact inverse
    (sequential decoding by torch) within float rounding, and the report of each block's segments."""
    from ntm_edge.decoding import DEFAULT_TOL, segment_bounds
    from ntm_edge.runtime.inversion import invert

    ids, mask = model.tokenize([str(i) for i in range(8)])
    u, t0 = model.sample_u(ids, mask, 4, np.random.default_rng(5), 0.0, model.config.t_min_sample)
    with torch.no_grad():
        ref = model.transporter.inverse(u, t0, 4, method="sequential").numpy()
    x, report = invert(rt, u.numpy(), t0, 4, "jacobi", segments=segments)
    assert np.abs(x - ref).max() < 1e-4 and np.abs(x - u.numpy()).max() > 0.05  # and far from the identity
    N = model.transporter.num_tokens
    per_block = segments if isinstance(segments, tuple) else (segments,) * 2
    for i, (G, its, res) in enumerate(zip(per_block, report.iterations, report.residuals, strict=True)):
        assert len(its) == G, f"block {i}: one entry per segment"
        for (start, end), k, r in zip(segment_bounds(N, G), its, res, strict=True):
            assert 0 < k <= end - start and (r <= DEFAULT_TOL or k == end - start - (start == 0))
    # a per-block cap reaches the block it names (block 1 is inverted first)
    _, capped = invert(rt, u.numpy(), t0, 4, "jacobi", max_iters=(N, 1))
    assert capped.iterations[1] == (1,) and not capped.converged[1][0] and capped.all_converged is False
    with pytest.raises(ConfigError, match="segments must be an integer from 1 to the 16 tokens"):
        invert(rt, u.numpy(), t0, 4, "jacobi", segments=17)


@pytest.mark.parametrize("final, method, guidance, unrolled, temperature", [
    ("inverse", "jacobi", 0.0, False, 1.0),
    ("inverse", "sequential", 1.5, False, 1.0),
    ("inverse", "jacobi", 2.0, True, 1.0),
    ("denoiser", "jacobi", 1.0, False, 1.0),
    ("inverse", "jacobi", 0.0, False, 0.8),
    ("inverse", "jacobi", 0.5, True, 0.6),
])
def test_run_matches_torch_sampler(model, tiny_bundle, rt, final, method, guidance, unrolled, temperature):
    from ntm_edge.denoiser import load_denoiser
    from ntm_edge.exits import sample_images

    prompts = [str(i) for i in range(10)]  # 3 engine batches of the bundle's 4
    denoiser = load_denoiser(tiny_bundle[0]) if final == "denoiser" else None
    ref = sample_images(model, prompts, seed=3, guidance=guidance, final=final, denoiser=denoiser, inverse_method=method,
                        temperature=temperature)
    got = generate(rt, prompts, seed=3, guidance=guidance, final=final, inverse_method=method, unrolled=unrolled,
                   temperature=temperature)
    assert got.images.shape == ref.shape == (10, 8, 8, 1) and got.images.dtype == np.uint8
    assert np.abs(got.images.astype(int) - ref).max() <= 1
    t_min = denoiser.config.t0 if denoiser else model.config.t_min_sample
    ids, mask = model.tokenize(prompts)
    u_ref, ts = model.sample_levels(ids, mask, 4, np.random.default_rng(3), guidance, t_min, temperature)
    assert np.array_equal(got.ts, ts)
    assert np.abs(got.u_levels - u_ref.numpy()).max() < 1e-4


def test_run_matches_torch_across_noise_chunks(model, tiny_bundle, rt):
    """More prompts than one noise chunk (NOISE_BATCH): the noise stream still lines up."""
    from ntm_edge.denoiser import load_denoiser
    from ntm_edge.exits import sample_images

    prompts = [str(i % 10) for i in range(NOISE_BATCH + 6)]
    ref = sample_images(model, prompts, seed=1, final="denoiser", denoiser=load_denoiser(tiny_bundle[0]))
    got = generate(rt, prompts, seed=1, final="denoiser")
    assert np.abs(got.images.astype(int) - ref).max() <= 1


def test_audit_nll_matches_torch(model, rt):
    from ntm_edge.data import load_dataset
    from ntm_edge.exits import invert_levels
    from ntm_edge.numerics import dequantize
    from ntm_edge.runtime.audit import generated_nll, trajectory_nll

    data = load_dataset("digits", "test", image_size=8)
    g = torch.Generator().manual_seed(0)
    traj = model.forward_trajectory(dequantize(torch.from_numpy(data.images[:12]), g), 4, generator=g)
    ids = torch.from_numpy(model.vocab.ids_for_labels(data.labels[:12]))
    mask = np.ones((12, 1), dtype=bool)
    with torch.no_grad():
        ref = model.trajectory_nll(traj, ids).double().numpy()
    got = trajectory_nll(rt, traj.x.numpy(), traj.t.numpy(), ids.numpy(), mask)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    u, ts = model.sample_levels(ids, torch.from_numpy(mask), 4, np.random.default_rng(0), 0.0, 0.025)
    with torch.no_grad():
        ref = model.trajectory_nll(invert_levels(model, u, ts), ids).double().numpy()
    for method in ("jacobi", "sequential"):
        got = generated_nll(rt, u.numpy(), ts, ids.numpy(), mask, method)
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def _mean_bits(output: str) -> float:
    match = re.search(r"mean: ([0-9.]+) bits/dim", output)
    assert match is not None, output
    return float(match.group(1))


def test_audit_cli_real_digits_beat_noise(model, tiny_bundle, rt, tmp_path):
    from PIL import Image

    from ntm_edge.data import load_dataset
    from ntm_edge.evaluate import heldout_likelihood
    from ntm_edge.runtime.audit import image_bound

    test = load_dataset("digits", "test", image_size=8)
    sevens = test.images[test.labels == 7][:16]
    noise = np.random.default_rng(0).integers(0, 256, sevens.shape, dtype=np.uint8)
    np.save(tmp_path / "sevens.npy", sevens)
    np.save(tmp_path / "noise.npy", noise)
    bits = {}
    for name in ("sevens", "noise"):
        r = runner.invoke(app, ["audit", "--bundle", str(tiny_bundle[1]), "--image", str(tmp_path / f"{name}.npy"),
                                "--prompt", "seven", "--trajectories", "2", "--threads", "1"])
        assert r.exit_code == 0, r.output
        assert r.output.count("bits/dim (bound") == 16
        bits[name] = _mean_bits(r.output)
    assert bits["sevens"] < bits["noise"] - 2.0, bits
    Image.fromarray(sevens[0, ..., 0]).save(tmp_path / "one.png")  # one image as a PNG
    r = runner.invoke(app, ["audit", "--bundle", str(tiny_bundle[1]), "--image", str(tmp_path / "one.png"),
                            "--prompt", "7", "--threads", "1"])
    assert r.exit_code == 0 and r.output.startswith("image   0:"), r.output
    # the estimator of the torch evaluation (other noise draws: they agree to a fraction of a bit)
    images, labels = test.images[:64], test.labels[:64]
    ours = image_bound(rt, images, [str(v) for v in labels], trajectories=2)["bits_per_dim"].mean()
    theirs = heldout_likelihood(model, images, labels)["bits_per_dim"]
    assert abs(ours - theirs) < 0.5, (ours, theirs)


def test_run_cli_writes_grid_array_latency_and_audit(tiny_bundle, tmp_path):
    png, npy = tmp_path / "g.png", tmp_path / "g.npy"
    r = runner.invoke(app, ["run", "--bundle", str(tiny_bundle[1]), "--prompt", "three", "--num", "5", "--seed", "2",
                            "--guidance", "1", "--final", "inverse", "--inverse-method", "sequential", "--out", str(png),
                            "--save-array", str(npy), "--audit", "--provider", "cpu", "--threads", "1"])
    assert r.exit_code == 0, r.output
    arr = np.load(npy)
    assert arr.shape == (5, 8, 8, 1) and arr.dtype == np.uint8 and png.exists()
    for stage in ("text encoder", "predictor x 4", "inverse (sequential)", "audit", "pipeline", "images/s"):
        assert stage in r.output, stage
    assert "CPUExecutionProvider" in r.output
    assert len(re.findall(r"sample +\d+: +[-0-9.]+ nats", r.output)) == 5
    # the default exit is the bundle's denoiser
    r = runner.invoke(app, ["run", "--bundle", str(tiny_bundle[1]), "--prompt", "3", "--num", "2",
                            "--out", str(png), "--unrolled", "--threads", "1"])
    assert r.exit_code == 0 and "denoiser" in r.output and "predictor x 4 (unrolled)" in r.output, r.output


@pytest.mark.parametrize("command", ["export", "run", "audit"])
def test_help(command):
    r = runner.invoke(app, [command, "--help"])
    assert r.exit_code == 0 and "Usage" in r.output


def _one_line_error(r, start: str) -> str:
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {start}"), r.output
    return lines[0]


def test_option_errors(tiny_bundle, tmp_path):
    b = str(tiny_bundle[1])
    out = ["--out", str(tmp_path / "x.png")]
    _one_line_error(runner.invoke(app, ["audit", "--prompt", "3", "--image", "x.png"]), "--bundle is required")
    _one_line_error(runner.invoke(app, ["run", "--bundle", b, "--prompt", "giraffe", *out]), "unknown prompt 'giraffe'")
    _one_line_error(runner.invoke(app, ["run", "--bundle", b, "--prompt", "3", "--final", "x", *out]), "unknown --final")
    _one_line_error(runner.invoke(app, ["run", "--bundle", b, "--prompt", "3", "--inverse-method", "newton", *out]),
                    "unknown --inverse-method")
    _one_line_error(runner.invoke(app, ["run", "--bundle", b, "--prompt", "3", "--provider", "tpu", *out]),
                    "unknown provider")
    _one_line_error(runner.invoke(app, ["run", "--bundle", b, "--prompt", "3", "--steps", "8", "--unrolled", *out]),
                    "the unrolled sampler graph was exported for --steps 4")
    _one_line_error(runner.invoke(app, ["run", "--bundle", str(tmp_path / "none"), "--prompt", "3", *out]),
                    "bundle directory")
    for bad in ("-0.5", "nan", "inf"):
        _one_line_error(runner.invoke(app, ["run", "--bundle", b, "--prompt", "3", "--temperature", bad, *out]),
                        "--temperature must be a finite number >= 0")
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(PromptError):
        open_runtime(b).bundle.vocab.token_id("giraffe")


def test_provider_order(monkeypatch):
    from ntm_edge.runtime import session

    assert session.choose_providers("cpu") == ["CPUExecutionProvider"]
    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(session, "available_providers", lambda: ["tensorrt", "cuda", "cpu"])
    assert session.choose_providers(None) == every
    assert session.choose_providers("auto") == every
    assert session.choose_providers("cuda") == every[1:]
    monkeypatch.setattr(session, "available_providers", lambda: ["cuda", "cpu"])
    assert session.choose_providers(None) == every[1:]
    with pytest.raises(ConfigError, match="provider 'tensorrt' is not available"):
        session.choose_providers("tensorrt")


def test_tensorrt_profile_from_io_spec(rt, tmp_path):
    """The TensorRT provider gets its optimisation profile from the IO spec (untested on TensorRT itself)."""
    from ntm_edge.runtime.session import tensorrt_options

    opts = tensorrt_options(rt.bundle.graphs["predictor_step"], tmp_path)
    assert opts["trt_profile_min_shapes"].startswith("u_t:1x1x8x8,t:1,s:1,steps:1,prompt_emb:1x1x32,")
    assert opts["trt_profile_max_shapes"].startswith("u_t:8x1x8x8,t:8,")  # 2 x the bundle's batch (guidance)
    assert "levels_t" not in tensorrt_options(rt.bundle.graphs["sampler_loop"], tmp_path)["trt_profile_opt_shapes"]


def _copy(bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    return out


def test_tampered_bundle_is_one_clear_error(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle[1], tmp_path)
    onnx_file = b / "predictor_step.fp32.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="predictor_step.fp32.onnx does not match its sha256"):
        open_runtime(b)
    line = _one_line_error(runner.invoke(app, ["run", "--bundle", str(b), "--prompt", "3",
                                               "--out", str(tmp_path / "x.png")]), "")
    assert "sha256" in line and "re-export" in line
    onnx_file.unlink()
    with pytest.raises(BundleError, match="is missing from the bundle"):
        open_runtime(b)


def test_manifest_version_and_corruption(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle[1], tmp_path)
    manifest = json.loads((b / MANIFEST).read_text())
    (b / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(BundleError, match=f"format version 99, this ntm-edge reads {FORMAT_VERSION}"):
        open_runtime(b)
    line = _one_line_error(runner.invoke(app, ["audit", "--bundle", str(b), "--prompt", "3", "--image", "x.png"]), "")
    assert "format version" in line
    files = dict(manifest["files"])
    files.pop("denoiser.fp32.onnx")
    (b / MANIFEST).write_text(json.dumps(seal({**manifest, "files": files})))  # re-sealed: past the content hash
    with pytest.raises(BundleError, match="graph 'denoiser' has no sha256"):
        open_runtime(b)
    (b / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="is corrupt"):
        open_runtime(b)
    (b / MANIFEST).unlink()
    with pytest.raises(BundleError, match="holds no manifest.json"):
        open_runtime(b)


def test_gaussian_model_without_transporter_or_denoiser(tmp_path):
    """f_T = identity: no transporter graphs; the default exit is the (trivial) inverse."""
    from ntm_edge import NTM
    from ntm_edge.checkpoint import save_model
    from ntm_edge.config import get_preset
    from ntm_edge.exits import sample_images

    torch.manual_seed(0)
    model = NTM(get_preset("tiny").with_data(1, tuple("0123456789")).for_objective("gaussian")).eval()
    save_model(model, tmp_path / "g", step=0, info={"dataset": "digits"})
    r = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "g"), "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    rt = open_runtime(tmp_path / "b", threads=1)
    assert set(rt.bundle.graphs) == {"prompt_encoder", "predictor_step", "sampler_loop"}
    got = generate(rt, ["1", "2", "3"], seed=4, guidance=1.0, audit=True)
    ref = sample_images(model, ["1", "2", "3"], seed=4, guidance=1.0)
    assert got.final == "inverse" and np.abs(got.images.astype(int) - ref).max() <= 1
    assert np.isfinite(got.nll).all()
    with pytest.raises(ConfigError, match="no denoiser"):
        generate(rt, ["1"], final="denoiser")


FORBID_IMPORTS = r"""
import sys

class Forbidden:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"the runtime must not import {name}")

sys.meta_path.insert(0, Forbidden())
"""

NO_TORCH = FORBID_IMPORTS + r"""
from ntm_edge.cli import app
bundle, out = sys.argv[1], sys.argv[2]
common = ["--bundle", bundle, "--prompt", "4", "--num", "3", "--threads", "1"]
for extra in (["--final", "inverse", "--inverse-method", "jacobi", "--audit", "--guidance", "1"],
              ["--final", "inverse", "--inverse-method", "sequential"],
              ["--final", "denoiser", "--unrolled"]):
    try:
        app(["run", *common, *extra, "--out", out + ".png", "--save-array", out + ".npy"])
    except SystemExit as e:
        assert e.code in (0, None), e.code
try:
    app(["audit", "--bundle", bundle, "--prompt", "4", "--image", out + ".npy", "--threads", "1"])
except SystemExit as e:
    assert e.code in (0, None), e.code
assert "torch" not in sys.modules and "transformers" not in sys.modules
torch_side = {"model", "transporter", "predictor", "layers", "denoiser", "exits", "export"}
assert not {m for m in sys.modules if m.startswith("ntm_edge.") and m.split(".")[1] in torch_side}
print("NO TORCH OK")
"""


def test_runtime_never_imports_torch(tiny_bundle, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", NO_TORCH, str(tiny_bundle[1]), str(tmp_path / "s")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "NO TORCH OK" in r.stdout, r.stdout + r.stderr
    assert np.load(tmp_path / "s.npy").shape == (3, 8, 8, 1)
