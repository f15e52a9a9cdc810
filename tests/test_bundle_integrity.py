"""Corruption of every file the runtime loads (manifest.json and each .onnx graph): flipped bytes,
truncation, removal, edited values (with and without a re-computed content hash), swapped graphs.
Each must end in one `error:` line naming the problem, never a traceback and never a result."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from cli_checks import one_line_error, tree_digest
from test_export import make_tiny_bundle
from typer.testing import CliRunner

from ntm_edge.cli import app
from ntm_edge.runtime import BundleError, open_runtime, specs
from ntm_edge.runtime.bundle import CONTENT_KEY, MANIFEST, content_digest, load_bundle, seal
from ntm_edge.runtime.session import Graph

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt, bundle, _ = make_tiny_bundle(tmp_path_factory)
    image = tmp_path_factory.mktemp("img") / "two.npy"
    np.save(image, np.full((2, 8, 8, 1), 100, np.uint8))
    before = tree_digest(bundle)
    yield bundle, image
    assert tree_digest(bundle) == before


def copy(bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    return out


def audit(bundle, image):
    return runner.invoke(app, ["audit", "--bundle", str(bundle), "--prompt", "3", "--image", str(image)])


def all_files(bundle) -> list[str]:
    return sorted(p.name for p in bundle.iterdir())


def test_content_hash_covers_the_whole_manifest(tiny):
    manifest = json.loads((tiny[0] / MANIFEST).read_text())
    assert manifest[CONTENT_KEY] == content_digest(manifest)
    edited = json.loads(json.dumps(manifest))
    edited["transporter"]["num_blocks"] = 1
    assert content_digest(edited) != manifest[CONTENT_KEY]
    assert content_digest({**manifest, "created": "x"}) != manifest[CONTENT_KEY]  # every field counts


@pytest.mark.parametrize("where", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_flipped_byte_in_any_file(tiny, tmp_path, where):
    bundle = copy(tiny[0], tmp_path)
    for name in all_files(bundle):
        path = bundle / name
        original = path.read_bytes()
        data = bytearray(original)
        i = min(int(where * len(data)), len(data) - 1)
        data[i] ^= 0x20 if name == MANIFEST and data[i] in b"0123456789" else 0xFF  # a digit stays a digit
        path.write_bytes(bytes(data))
        line = one_line_error(audit(bundle, tiny[1]))
        assert name in line, (name, line)
        path.write_bytes(original)


@pytest.mark.parametrize("keep", [0.0, 0.5, "all but one byte"])
def test_truncated_or_missing_file(tiny, tmp_path, keep):
    bundle = copy(tiny[0], tmp_path)
    for name in all_files(bundle):
        path = bundle / name
        original = path.read_bytes()
        path.write_bytes(original[: len(original) - 1 if keep == "all but one byte" else int(keep * len(original))])
        assert name in one_line_error(audit(bundle, tiny[1]))
        path.unlink()
        assert name in one_line_error(audit(bundle, tiny[1]))
        path.write_bytes(original)
    assert audit(bundle, tiny[1]).exit_code == 0  # restored: the same bundle loads again


def _edit(bundle, change, reseal: bool):
    manifest = json.loads((bundle / MANIFEST).read_text())
    change(manifest)
    (bundle / MANIFEST).write_text(json.dumps(seal(manifest) if reseal else manifest, indent=2))


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(m):
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value

    return change


EDITS = {  # edit -> what the refusal names once the content hash is re-computed over the edit
    "batch 0": (_set("batch", 0), "batch is 0"),
    "batch -3": (_set("batch", -3), "batch is -3"),
    "batch '4'": (_set("batch", "4"), "batch is '4'"),
    "batch true": (_set("batch", True), "batch is True"),
    "transporter.num_blocks": (_set("transporter", "num_blocks", 1), "transporter.num_blocks is 1, but the config gives 2"),
    "transporter.flip": (_set("transporter", "flip", [False]), "transporter.flip"),
    "transporter.token_dim": (_set("transporter", "token_dim", 8), "transporter.token_dim"),
    "prompts.class_names": (_set("prompts", "class_names", list("0123")), "prompts.class_names"),
    "prompts.null_id": (_set("prompts", "null_id", 3), "prompts.null_id"),
    "schedule.steps": (_set("schedule", "steps", 8), "schedule.steps is 8"),
    "schedule.levels_t reversed": (lambda m: m["schedule"]["levels_t"].reverse(), "schedule.levels_t"),
    "denoiser.steps 0": (_set("denoiser", "steps", 0), "denoiser.steps is 0"),
    "denoiser.t0 2": (_set("denoiser", "t0", 2.0), "denoiser.t0 is 2.0"),
    "denoiser removed": (_set("denoiser", None), "denoiser is None"),
    "config.image_size": (_set("config", "image_size", 16), "the config gives 64"),
    "config.channels": (_set("config", "channels", 3), "transporter.token_dim is 4, but the config gives 12"),
    "config.steps 0": (_set("config", "steps", 0), "manifest.json"),
    "config missing": (lambda m: m.pop("config"), "incomplete or malformed"),
    "graph shape": (_set("graphs", "predictor_step", "inputs", 0, "shape", ["batch", 1, 8, 9]),
                    "graphs.predictor_step.inputs.u_t is float32 ['batch', 1, 8, 9], but the config gives"),
    "graph dims": (_set("graphs", "predictor_step", "dims", "batch", "max", 4), "graphs.predictor_step.dims"),
    "graph removed": (lambda m: m["graphs"].pop("prompt_encoder"), "lists no graph 'prompt_encoder'"),
    "file outside": (lambda m: m["files"].update({"../x": m["files"]["prompt_encoder.fp32.onnx"]}), "outside the bundle"),
    "format": (_set("format", "something-else"), "not an ntm-edge bundle manifest"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_manifest(tiny, tmp_path, edit):
    change, message = EDITS[edit]
    bundle = copy(tiny[0], tmp_path)
    _edit(bundle, change, reseal=False)
    line = one_line_error(audit(bundle, tiny[1]))
    assert "content hash" in line or "not an ntm-edge bundle manifest" in line, line
    shutil.copy(tiny[0] / MANIFEST, bundle / MANIFEST)
    _edit(bundle, change, reseal=True)  # a consistent hash over inconsistent values: the values are checked
    assert message in one_line_error(audit(bundle, tiny[1]))
    with pytest.raises(BundleError):
        open_runtime(bundle)


def _reseal_files(bundle):
    _edit(bundle, lambda m: m["files"].update({p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                               for p in bundle.glob("*.onnx")}), reseal=True)


def test_truncated_graph_with_forged_hashes(tiny, tmp_path):
    """Past every hash (files and manifest re-hashed), onnxruntime's own load is one line too."""
    bundle = copy(tiny[0], tmp_path)
    for name in [p.name for p in sorted(bundle.glob("*.onnx"))]:
        path = bundle / name
        original = path.read_bytes()
        path.write_bytes(original[: len(original) // 2])
        _reseal_files(bundle)
        rt = open_runtime(bundle, provider="cpu", threads=1)
        with pytest.raises(BundleError, match=f"{name} cannot be loaded by onnxruntime"):
            rt[name.split(".")[0]]
        path.write_bytes(original)
    _reseal_files(bundle)
    path = bundle / "predictor_step.fp32.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    _reseal_files(bundle)
    assert "predictor_step.fp32.onnx cannot be loaded by onnxruntime" in one_line_error(audit(bundle, tiny[1]))


def test_swapped_graphs_with_forged_hashes(tiny, tmp_path):
    """A valid graph in another graph's place: its inputs and outputs do not match the spec."""
    bundle = copy(tiny[0], tmp_path)
    a, b = bundle / "transporter_jacobi_0.fp32.onnx", bundle / "transporter_step_0.fp32.onnx"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    _reseal_files(bundle)
    rt = open_runtime(bundle, provider="cpu", threads=1)
    with pytest.raises(BundleError, match="does not have the inputs and outputs its manifest entry lists"):
        rt["transporter_jacobi_0"]
    r = runner.invoke(app, ["run", "--bundle", str(bundle), "--prompt", "3", "--num", "1", "--final", "inverse",
                            "--inverse-method", "jacobi", "--out", str(tmp_path / "x.png")])
    assert "transporter_jacobi_0.fp32.onnx does not have the inputs" in one_line_error(r)
    assert not (tmp_path / "x.png").exists()


def test_graph_io_spec_is_checked_against_the_loaded_file(tiny, tmp_path):
    """The manifest's IO spec of a graph must be the one its config implies, and the loaded file must have
    the shapes of its spec (a tensor named, with both shapes)."""
    bundle = copy(tiny[0], tmp_path)

    def change(m):  # the denoiser's spec claims 8 x 9 images
        for t in (*m["graphs"]["denoiser"]["inputs"][:1], *m["graphs"]["denoiser"]["outputs"]):
            t["shape"] = ["batch", 1, 8, 9]

    _edit(bundle, change, reseal=True)
    with pytest.raises(BundleError, match="graphs.denoiser.inputs.u is float32"):
        load_bundle(bundle)
    spec = load_bundle(tiny[0]).graphs["denoiser"]
    wrong = specs.GraphSpec(spec.name, (specs.TensorSpec("u", "float32", ("batch", 1, 8, 9)), *spec.inputs[1:]),
                            spec.outputs, spec.dims)
    with pytest.raises(BundleError, match=r"u is tensor\(float\) \['batch', 1, 8, 8\] in the graph, but the manifest"):
        Graph(wrong, tiny[0] / "denoiser.fp32.onnx", ["CPUExecutionProvider"], threads=1)
