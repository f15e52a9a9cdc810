"""`ntm-edge export`: the ONNX bundle (manifest, IO specs, graphs) and the parity of every graph.

The bundle comes from a tiny model trained for a few seconds on digits, with a small denoiser whose
zero-initialised output layer is replaced by random weights (so its graph computes something), exported
through the CLI. ``make_tiny_bundle`` builds it once per test session; tests/test_runtime.py uses it too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ntm_edge import schedule
from ntm_edge.checkpoint import load_config
from ntm_edge.cli import app
from ntm_edge.errors import ConfigError
from ntm_edge.fileio import sha256_file
from ntm_edge.runtime import specs
from ntm_edge.runtime.bundle import FORMAT_VERSION, MANIFEST, load_bundle

TRAIN_STEPS = 120  # ~15 s on one busy core; enough for held-out digits to score far below noise
BATCH = 4  # the bundle's batch: sampling 10 images runs 3 engine batches
# float32 parity: graphs of a few hundred ops, inputs of scale ~1-30
ATOL, RTOL = 1e-5, 1e-5

runner = CliRunner()


def make_tiny_bundle(tmp_path_factory) -> tuple:
    """(checkpoint dir, bundle dir, CLI output of the export), built once per test run (``built_once``)."""
    from conftest import built_once

    def build(root: Path) -> None:
        from ntm_edge import NTM
        from ntm_edge.denoiser import Denoiser, DenoiserConfig, save_denoiser
        from ntm_edge.train import TrainArgs, train

        ckpt, bundle = root / "ckpt", root / "bundle"
        torch.set_num_threads(1)
        train(TrainArgs(dataset="digits", preset="tiny", steps=TRAIN_STEPS, batch_size=32, lr=2e-3, out=str(ckpt),
                        eval_images=0), progress=False, log=lambda *_: None)
        cfg = NTM.from_pretrained(ckpt).config
        with torch.random.fork_rng():  # the denoiser's random weights: the same in every run, whatever ran before
            torch.manual_seed(0)
            den = Denoiser(DenoiserConfig(image_size=cfg.image_size, channels=cfg.channels,
                                          num_prompt_tokens=len(cfg.prompt.class_names) + 1, t0=cfg.t_min_sample,
                                          steps=cfg.steps, prompt_dim=cfg.prompt.dim, width=32, depth=1, heads=2))
        with torch.no_grad():
            den.net.out.weight.copy_(torch.randn(den.net.out.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        save_denoiser(den.eval(), ckpt, {"note": "random weights, for the export tests"})
        result = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--out", str(bundle), "--batch", str(BATCH)])
        assert result.exit_code == 0, result.output
        (root / "export.log").write_text(result.output)

    root = built_once(tmp_path_factory, "ntm_export_tiny", build)
    return root / "ckpt", root / "bundle", (root / "export.log").read_text()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def manifest(tiny_bundle) -> dict:
    return json.loads((tiny_bundle[1] / MANIFEST).read_text())


def graph_names(cfg) -> list[str]:
    blocks = [g for i in range(cfg.transporter.num_blocks) for g in (specs.jacobi_graph(i), specs.step_graph(i))]
    return [specs.PROMPT_ENCODER, specs.PREDICTOR_STEP, specs.SAMPLER_LOOP, specs.TRANSPORTER_FORWARD, *blocks,
            specs.DENOISER]


def test_manifest(tiny_bundle, manifest):
    ckpt, bundle, _ = tiny_bundle
    cfg = load_config(ckpt)
    assert manifest["format_version"] == FORMAT_VERSION and manifest["opset"] == 17 and manifest["batch"] == BATCH
    assert manifest["config"] == json.loads(cfg.to_json())
    assert manifest["versions"]["torch"] == torch.__version__ and "onnx" in manifest["versions"]
    assert manifest["schedule"]["levels_t"] == schedule.time_grid(cfg.steps, cfg.t_min_sample, cfg.shift).tolist()
    assert manifest["prompts"]["class_names"] == list(cfg.prompt.class_names)
    assert manifest["denoiser"] == {"t0": cfg.t_min_sample, "steps": cfg.steps}
    assert list(manifest["graphs"]) == graph_names(cfg)
    # sha256 of every file but the manifest itself
    assert set(manifest["files"]) == {p.name for p in bundle.iterdir()} - {MANIFEST}
    for name, digest in manifest["files"].items():
        assert sha256_file(bundle / name) == digest
    # IO specs as data: the manifest entry is exactly the spec the exporter and the runtime use
    expected = specs.graph_specs(cfg, BATCH, has_denoiser=True)
    for name, entry in manifest["graphs"].items():
        assert entry["variants"] == {"fp32": {"file": f"{name}.fp32.onnx"}}
        assert specs.GraphSpec.from_dict(name, entry) == expected[name]
        assert {k: v for k, v in entry.items() if k != "variants"} == expected[name].to_dict()
    step = manifest["graphs"][specs.PREDICTOR_STEP]
    assert step["dims"] == {"batch": {"min": 1, "opt": 2 * BATCH, "max": 2 * BATCH}}  # guided: 2B
    u_t = step["inputs"][0]
    assert u_t["name"] == "u_t" and u_t["dynamic_axes"] == {"0": "batch"}
    assert u_t["min_shape"] == [1, 1, 8, 8] and u_t["max_shape"] == [2 * BATCH, 1, 8, 8]


def test_graphs_pass_onnx_checker_with_dynamic_batch(tiny_bundle, manifest):
    import onnx

    bundle = tiny_bundle[1]
    for name, entry in manifest["graphs"].items():
        model = onnx.load(str(bundle / entry["variants"]["fp32"]["file"]))
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == [t["name"] for t in entry["inputs"]]
        assert [o.name for o in model.graph.output] == [t["name"] for t in entry["outputs"]]
        for io, spec in zip(model.graph.input, entry["inputs"], strict=True):
            dims = [d.dim_param or d.dim_value for d in io.type.tensor_type.shape.dim]
            assert dims == spec["shape"], (name, io.name, dims)
        assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) == 17


def test_parity_random_inputs(tiny_bundle):
    """Every graph, onnxruntime vs the torch module it was traced from, at a batch it was not traced at."""
    from ntm_edge import NTM
    from ntm_edge.denoiser import load_denoiser
    from ntm_edge.export.graphs import graph_modules
    from ntm_edge.export.parity import max_abs, random_inputs, torch_outputs
    from ntm_edge.runtime import Runtime

    ckpt, bundle_dir, _ = tiny_bundle
    model = NTM.from_pretrained(ckpt)
    modules = graph_modules(model, load_denoiser(ckpt))
    rt = Runtime(load_bundle(bundle_dir), provider="cpu", threads=1)
    rng = np.random.default_rng(7)
    report = {}
    for name, spec in rt.bundle.graphs.items():
        inputs = random_inputs(spec, model.config, 5, rng)
        err, scale = max_abs(rt[name](**inputs), torch_outputs(modules[name], spec, inputs))
        report[name] = err
        assert err <= ATOL + RTOL * scale, (name, err, scale)
    print("max abs error, random inputs:", {k: f"{v:.1e}" for k, v in report.items()})


def test_parity_real_trajectories_in_manifest(tiny_bundle, manifest):
    """The export measured every graph on forward trajectories of held-out digits and recorded it."""
    parity = manifest["parity"]
    assert parity["real_source"] == "held-out images of digits"
    assert list(parity["graphs"]) == list(manifest["graphs"])
    for name, entry in parity["graphs"].items():
        for kind in ("random", "real"):
            assert entry[kind]["max_abs"] <= ATOL + RTOL * entry[kind]["scale"], (name, kind, entry)
    output = tiny_bundle[2]
    assert "parity" in output and all(name in output for name in manifest["graphs"])


def test_export_refuses_to_overwrite_and_replaces_atomically(tiny_bundle, tmp_path):
    ckpt, bundle, _ = tiny_bundle
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    before = sha256_file(out / MANIFEST)
    r = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--out", str(out), "--no-parity"])
    assert r.exit_code == 1 and "--overwrite" in r.output
    r = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--out", str(out), "--no-parity", "--overwrite",
                            "--batch", "2", "--opset", "18"])
    assert r.exit_code == 0, r.output
    new = load_bundle(out)
    assert new.batch == 2 and new.manifest["opset"] == 18 and sha256_file(out / MANIFEST) != before
    assert "parity" not in new.manifest
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary directories left behind
    r = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "c"), "--opset", "9"])
    assert r.exit_code == 1 and r.output.startswith("error: --opset must lie in")


def test_flow_matching_checkpoint_is_refused(tmp_path):
    from ntm_edge import NTM
    from ntm_edge.checkpoint import save_model
    from ntm_edge.config import get_preset
    from ntm_edge.export import export_bundle

    cfg = get_preset("tiny").with_data(1, tuple("0123456789")).for_objective("fm")
    save_model(NTM(cfg), tmp_path / "fm", step=0, info={"dataset": "digits"})
    with pytest.raises(ConfigError, match="flow-matching"):
        export_bundle(tmp_path / "fm", tmp_path / "out", log=lambda *_: None)
    assert not (tmp_path / "out").exists()
