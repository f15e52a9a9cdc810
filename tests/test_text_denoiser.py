"""The text model's learned denoiser (the session's MiniLM model with a few-step denoiser,
``conftest.text_denoiser_ckpt``): it shares the frozen encoder, its exported graph reads the encoder's
output, the runtime draws the same images as `ntm-edge sample` without torch, and its fp16 / int8 export.
A module of its own, apart from tests/test_text_prompts.py, so that the suite's two workers can run the
two at once (the models and bundles themselves are built once per run, in conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_text_prompts import NO_TORCH_TEXT
from typer.testing import CliRunner

from ntm_edge.cli import app

runner = CliRunner()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NTM_EDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_text_denoiser_shares_the_encoder(text_denoiser_ckpt, tmp_path, cache_dir):
    from ntm_edge.denoiser import WEIGHTS, load_denoiser
    from ntm_edge.text_prompts import shared_minilm

    den = load_denoiser(text_denoiser_ckpt)
    assert den.prompt_encoder.minilm is shared_minilm() and den.config.prompt_kind == "minilm"
    assert not [k for k in den.state_dict() if k.startswith("prompt_encoder")]
    assert (text_denoiser_ckpt / WEIGHTS).stat().st_size < 5 * 2**20
    r = runner.invoke(app, ["sample", "--checkpoint", str(text_denoiser_ckpt), "--prompt", "a handwritten five", "--num",
                            "2", "--final", "denoiser", "--out", str(tmp_path / "d.png")])
    assert r.exit_code == 0, r.output

def test_text_denoiser_is_exported_and_reads_the_encoder_output(text_denoiser_bundle, text_bundle):
    """The denoiser graph of a text bundle takes the prompt encoder's output (not ids), and the encoder
    graph is the same file as in the bundle without a denoiser."""
    manifest = json.loads((text_denoiser_bundle[0] / "manifest.json").read_text())
    inputs = [t["name"] for t in manifest["graphs"]["denoiser"]["inputs"]]
    assert inputs == ["u", "prompt_emb", "prompt_mask"] and manifest["denoiser"] is not None
    parity = manifest["parity"]["graphs"]["denoiser"]
    assert parity["random"]["max_abs"] < 1e-3 and parity["real"]["max_abs"] < 1e-3, parity
    plain = json.loads((text_bundle / "manifest.json").read_text())
    assert manifest["files"]["prompt_encoder.fp32.onnx"] == plain["files"]["prompt_encoder.fp32.onnx"]

def test_runtime_text_denoiser_draws_the_same_images_as_sample(text_denoiser_bundle, text_denoiser_ckpt, cache_dir):
    from ntm_edge import NTM
    from ntm_edge.denoiser import load_denoiser
    from ntm_edge.exits import sample_images
    from ntm_edge.runtime import open_runtime
    from ntm_edge.runtime.sampler import generate

    prompts = ["a handwritten seven", "someone wrote a 3 here", "", "the numeral 0 in ink", "1", "a messy 6"]
    rt = open_runtime(text_denoiser_bundle[0], provider="cpu", threads=1)  # fp32, the default
    got = generate(rt, prompts, steps=4, seed=3, guidance=2.0)  # the default exit of a bundle with a denoiser
    model, den = NTM.from_pretrained(text_denoiser_ckpt), load_denoiser(text_denoiser_ckpt)
    want = sample_images(model, prompts, steps=4, seed=3, guidance=2.0, final="denoiser", denoiser=den)
    assert got.final == "denoiser" and "denoiser" in got.timer.seconds
    assert np.abs(got.images.astype(int) - want).max() <= 1
    inverse = generate(rt, prompts, steps=4, seed=3, guidance=2.0, final="inverse")
    assert (inverse.images != got.images).any()  # the denoiser, not the inverse, made them

def test_text_denoiser_graph_equals_the_denoiser_on_ids(tmp_path):
    """The exported text denoiser graph, fed the MiniLM's output, against the torch denoiser's own forward on
    the ids, at full output scale: a fresh denoiser with every weight perturbed (the 5-step one of the
    fixtures still outputs ~0.007, too small for parity to say much)."""
    import onnxruntime

    from ntm_edge.config import get_preset
    from ntm_edge.denoiser import Denoiser, DenoiserConfig
    from ntm_edge.export.graphs import TextDenoiserGraph
    from ntm_edge.export.writer import _export_graph
    from ntm_edge.runtime import specs

    cfg = get_preset("tiny").with_data(1, tuple("0123456789")).with_text_encoder("minilm")
    torch.manual_seed(0)
    den = Denoiser(DenoiserConfig(image_size=cfg.image_size, channels=1, num_prompt_tokens=11, t0=0.025, steps=4,
                                  prompt_dim=384, prompt_kind="minilm", max_tokens=16, width=32, depth=2, heads=2)).eval()
    with torch.no_grad():
        for param in den.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    spec = specs.graph_specs(cfg, 4, has_denoiser=True)[specs.DENOISER]
    assert spec.input_names == ["u", "prompt_emb", "prompt_mask"]
    ids, mask = den.prompt_encoder.tokenizer.tokenize(["a handwritten seven", "", "someone wrote a 3 here"])
    u = torch.randn(3, 1, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emb = den.prompt_encoder.embed(torch.from_numpy(ids))
        ref = den(u, torch.from_numpy(ids), torch.from_numpy(mask)).numpy()  # the denoiser on ids, MiniLM inside
    example = {"u": u.numpy(), "prompt_emb": emb.numpy(), "prompt_mask": mask}
    _export_graph(TextDenoiserGraph(den).eval(), spec, example, tmp_path / "d.onnx", 17)
    got = onnxruntime.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"]).run(None, example)[0]
    scale = float(np.abs(ref).max())
    assert scale > 0.3 and float(np.abs(got - ref).max()) <= 1e-4 + 1e-4 * scale, (scale, np.abs(got - ref).max())

def test_runtime_text_denoiser_imports_neither_torch_nor_transformers(text_denoiser_bundle, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NTM_EDGE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", NO_TORCH_TEXT, str(text_denoiser_bundle[0]), str(tmp_path / "s"),
                        "--final", "denoiser"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "NO TORCH OK" in r.stdout, r.stdout + r.stderr
    assert "denoiser" in r.stdout and np.load(tmp_path / "s.npy").shape == (2, 8, 8, 1)

def test_text_model_exports_fp16_and_int8(text_denoiser_bundle, text_denoiser_ckpt):
    """--fp16 --int8 on a text model with a denoiser (the session's, exported once with the options of
    conftest.TEXT_PRECISION_EXPORT, which also checks that the export left the checkpoint untouched):
    calibration and the quality gate take the class names as prompts; the MiniLM stays the builder's fp32
    file in every precision; each precision against torch on real trajectories within the tolerances of
    tests/test_precision.py (fp16: 4 ulps, int8: 4% of scale). The model is the session's text model with its
    few-step denoiser: the checks compare graphs with torch, not sample quality."""
    from ntm_edge import NTM
    from ntm_edge.denoiser import load_denoiser
    from ntm_edge.export.graphs import graph_modules
    from ntm_edge.export.parity import real_parity, real_trajectories
    from ntm_edge.runtime import Runtime, load_bundle
    from ntm_edge.runtime.sampler import generate
    from ntm_edge.runtime.text_graph import expected_sha256

    (out, output), ckpt = text_denoiser_bundle, text_denoiser_ckpt
    bundle = load_bundle(out)
    graphs = bundle.manifest["graphs"]
    for precision in ("fp16", "int8"):
        assert graphs["prompt_encoder"]["variants"][precision]["file"] == "prompt_encoder.fp32.onnx"
        assert graphs["denoiser"]["variants"][precision]["file"] == f"denoiser.{precision}.onnx"
    assert bundle.manifest["files"]["prompt_encoder.fp32.onnx"] == expected_sha256()
    rows = {row["precision"]: row for row in bundle.manifest["precision"]["quality"]["rows"]}
    assert list(rows) == ["fp32", "fp16", "int8"] and all(row["finite"] for row in rows.values()), rows
    assert 0 < rows["fp16"]["max_abs_du"] < rows["int8"]["max_abs_du"] and "quality gate" in output

    model = NTM.from_pretrained(ckpt).requires_grad_(False)
    modules = graph_modules(model, load_denoiser(ckpt))
    traj, ids, _ = real_trajectories(model, ckpt, n=8)
    for precision, rel in (("fp16", 4 * 2.0**-11), ("int8", 0.04)):
        rt = Runtime(bundle, provider="cpu", threads=1, precision=precision)
        for name, (err, scale) in real_parity(rt, model, modules, traj, ids).items():
            runs = graphs[name]["variants"][precision]["runs"]
            tol = 1e-4 + 1e-4 * scale if runs == "fp32" else rel * max(scale, 1.0)
            assert np.isfinite(err) and err <= tol, (precision, name, err, scale)
        got = generate(rt, ["a handwritten seven", ""], seed=1, guidance=2.0)
        assert got.final == "denoiser" and np.isfinite(got.x0).all()
