"""TensorRT engines (`ntm-edge build-engines`) and the native backend (`--provider tensorrt`).

TensorRT cannot be installed here, so the tests that build and run engines skip with that reason. What
runs here: engine names carry the TensorRT version and the GPU, a stale engine (another TensorRT,
another GPU, another ONNX file) is refused, optimisation profiles come from the IO specs (static by
default), static engines pad a short batch, and a missing TensorRT is one error line. The ONNX files
themselves are checked against TensorRT's parser table in tests/test_precision.py.
"""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
from test_export import BATCH, make_tiny_bundle
from typer.testing import CliRunner

from ntm_edge.cli import app
from ntm_edge.runtime import load_bundle
from ntm_edge.runtime.bundle import BundleError
from ntm_edge.runtime.tensorrt_backend import (
    ENGINE_DIR,
    engine_name,
    find_engine,
    pad_batch,
    profile_shapes,
    timing_cache_name,
    unpad,
)

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installable here")
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory)


def test_engine_names_carry_version_and_gpu():
    assert engine_name("predictor_step", "int8", "10.3.0", (8, 7)) == "predictor_step.int8.trt10.3.0.sm87.engine"
    assert engine_name("predictor_step", "int8", "11.0.0", (8, 7)) != engine_name("predictor_step", "int8", "10.3.0", (8, 7))
    assert engine_name("predictor_step", "int8", "10.3.0", (8, 9)) != engine_name("predictor_step", "int8", "10.3.0", (8, 7))
    assert timing_cache_name("10.3.0", (8, 7)) == "timing.trt10.3.0.sm87.cache"


def test_profiles_from_io_specs(tiny_bundle):
    spec = load_bundle(tiny_bundle[1]).graphs["predictor_step"]
    static, dynamic = profile_shapes(spec), profile_shapes(spec, dynamic=True)
    assert static["u_t"] == ((2 * BATCH, 1, 8, 8),) * 3  # static by default: min = opt = max = the spec's opt
    assert dynamic["u_t"] == ((1, 1, 8, 8), (2 * BATCH, 1, 8, 8), (2 * BATCH, 1, 8, 8))
    loop = load_bundle(tiny_bundle[1]).graphs["sampler_loop"]
    assert profile_shapes(loop, dynamic=True)["levels_t"] == ((5,),) * 3  # a static input stays static


def test_static_engines_pad_short_batches(tiny_bundle):
    spec = load_bundle(tiny_bundle[1]).graphs["sampler_loop"]
    rng = np.random.default_rng(0)
    inputs = {"u_top": rng.standard_normal((3, 1, 8, 8)), "noise": rng.standard_normal((3, 4, 1, 8, 8)),
              "levels_t": np.linspace(0, 1, 5), "prompt_emb": rng.standard_normal((3, 1, 32)),
              "null_emb": rng.standard_normal((3, 1, 32)), "prompt_mask": np.ones((3, 1), bool),
              "null_mask": np.ones((3, 1), bool), "guidance": np.ones(1)}
    padded, n = pad_batch(inputs, spec, BATCH)
    assert n == 3 and padded["u_top"].shape[0] == BATCH and padded["levels_t"].shape == (5,)
    assert np.array_equal(padded["noise"][:3], inputs["noise"]) and np.array_equal(padded["noise"][3], inputs["noise"][2])
    out = unpad({"u_levels": np.zeros((BATCH, 5, 1, 8, 8))}, spec, n)
    assert out["u_levels"].shape[0] == 3
    with pytest.raises(Exception, match="at most"):
        pad_batch({k: np.concatenate([v] * 2) if v.ndim and v.shape[0] == 3 else v for k, v in inputs.items()}, spec, 4)


def test_stale_engines_are_refused(tiny_bundle, tmp_path):
    """An engine is used only if engines.json says it was built from this ONNX file by this TensorRT for
    this GPU (engines are keyed by content, never by existence alone)."""
    root = tmp_path / "b"
    shutil.copytree(tiny_bundle[1], root)
    bundle = load_bundle(root)
    graph, onnx_file = "predictor_step", "predictor_step.fp32.onnx"
    name = engine_name(graph, "fp32", "10.3.0", (8, 7))
    (root / ENGINE_DIR).mkdir()
    (root / ENGINE_DIR / name).write_bytes(b"plan")
    record = {"graph": graph, "precision": "fp32", "onnx": onnx_file, "onnx_sha256": bundle.manifest["files"][onnx_file],
              "tensorrt": "10.3.0", "compute_capability": [8, 7], "static": True}
    index = {"engines": {name: record}}
    assert find_engine(bundle, index, graph, "fp32", "10.3.0", (8, 7)) == root / ENGINE_DIR / name
    for version, cc in (("10.4.0", (8, 7)), ("10.3.0", (8, 9))):  # another TensorRT, another GPU
        with pytest.raises(BundleError, match="no up-to-date TensorRT"):
            find_engine(bundle, index, graph, "fp32", version, cc)
    index["engines"][name] = {**record, "onnx_sha256": "0" * 64}  # built from another ONNX file
    with pytest.raises(BundleError, match="run `ntm-edge build-engines"):
        find_engine(bundle, index, graph, "fp32", "10.3.0", (8, 7))


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed: the error path cannot be reached")
def test_missing_tensorrt_is_one_error_line(tiny_bundle):
    for args in (["build-engines", "--bundle", str(tiny_bundle[1])],
                 ["run", "--bundle", str(tiny_bundle[1]), "--prompt", "3", "--provider", "tensorrt"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and r.output.startswith("error: TensorRT engines") and r.output.count("\n") == 1


@needs_trt
def test_engines_build_run_and_match_the_cpu_runtime(tiny_bundle, tmp_path):
    from ntm_edge.calib.engines import build_engines
    from ntm_edge.runtime import Runtime
    from ntm_edge.runtime.sampler import generate

    root = tmp_path / "b"
    shutil.copytree(tiny_bundle[1], root)
    index = build_engines(root, log=lambda *_: None)
    assert all(e["static"] for e in index["engines"].values())
    assert any(p.name.startswith("timing.trt") for p in (root / ENGINE_DIR).iterdir())
    prompts = [str(i) for i in range(6)]  # a short last batch: padded to the static engine batch
    cpu = generate(Runtime(load_bundle(root), "cpu"), prompts, seed=1, unrolled=True)
    gpu_rt = Runtime(load_bundle(root), "tensorrt")
    gpu = generate(gpu_rt, prompts, seed=1, unrolled=True)
    again = generate(gpu_rt, prompts, seed=1, unrolled=True)  # replayed CUDA graphs give the same images
    assert np.array_equal(gpu.images, again.images)
    assert np.abs(gpu.u_levels - cpu.u_levels).max() < 1e-2  # TF32 convolutions on the GPU
    assert build_engines(root, log=lambda *_: None) == index  # up to date: nothing rebuilt


@needs_trt
def test_engines_at_every_precision(tiny_bundle, tmp_path):
    """Strongly typed fp16 and int8 engines from the ONNX files (no builder precision flags)."""
    from ntm_edge.calib.engines import build_engines
    from ntm_edge.calib.policy import PrecisionOptions
    from ntm_edge.export import export_bundle
    from ntm_edge.runtime import Runtime
    from ntm_edge.runtime.sampler import generate

    opts = PrecisionOptions(fp16=True, int8=True, calib_images=32, calib_samples=8, quality_samples=16, audit_images=4)
    export_bundle(tiny_bundle[0], tmp_path / "b", batch=BATCH, parity=False, log=lambda *_: None, precisions=opts)
    index = build_engines(tmp_path / "b", precisions=["fp16", "int8"], log=lambda *_: None)
    assert {e["precision"] for e in index["engines"].values()} >= {"fp16", "int8"}
    for precision in ("fp16", "int8"):
        out = generate(Runtime(load_bundle(tmp_path / "b"), "tensorrt", precision=precision), ["3"] * 4, seed=0)
        assert np.isfinite(out.u_levels).all()
