"""The torch-free builder of the MiniLM prompt-encoder graph (runtime/text_graph.py): its output against
the torch MiniLM on real prompts (paraphrases, padding, ''), at two prompt lengths and with the
LayerNorm decomposed (opset 14); byte-identical files build after build (the pinned sha256); a build
in a process where torch and transformers cannot be imported; and the export writing exactly that file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_runtime import FORBID_IMPORTS

from ntm_edge.fileio import sha256_file
from ntm_edge.runtime.text_graph import expected_sha256, write_text_encoder_onnx
from ntm_edge.text_prompts import TextPromptEncoder

PROMPTS = ["a handwritten seven", "someone wrote a 7 here", "the digit seven, drawn by hand", "", "x",
           "an old scan of a nine", "a quick pen stroke forming 8", "éàü unicode digit 4", "ZERO", "3 3 3 3"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The graph at the default opset, built once for this module."""
    path = tmp_path_factory.mktemp("text_graph") / "prompt_encoder.onnx"
    write_text_encoder_onnx(path)
    return path


def _session(path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _agreement(path, max_tokens: int):
    """(min cosine over real tokens, max abs error, padding exactly zero) of the graph vs the torch MiniLM."""
    enc = TextPromptEncoder(max_tokens)
    ids, mask = enc.tokenizer.tokenize(PROMPTS)
    got = _session(path).run(["prompt_emb"], {"ids": ids})[0]  # (B, P, E)
    with torch.no_grad():
        ref = enc.embed(torch.from_numpy(ids)).numpy()
    a, b = got[mask].astype(np.float64), ref[mask].astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.min()), float(np.abs(got - ref).max()), bool((got[~mask] == 0).all())


@pytest.mark.parametrize("max_tokens", [16, 40])
def test_builder_matches_the_torch_minilm(built, max_tokens):
    cos, err, padding_zero = _agreement(built, max_tokens)  # one file for every prompt length
    assert cos > 0.999 and err < 1e-3 and padding_zero, (cos, err, padding_zero)


def test_builder_io_is_the_prompt_encoder_spec(built):
    """Names, dtypes and ranks of the text model's spec; the token axis symbolic (one file for every P)."""
    import onnx

    from ntm_edge.config import get_preset
    from ntm_edge.runtime import specs

    cfg = get_preset("tiny").with_data(1, tuple("0123456789")).with_text_encoder("minilm")
    spec = specs.graph_specs(cfg)[specs.PROMPT_ENCODER]
    model = onnx.load(str(built))
    io = [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
          for v in (*model.graph.input, *model.graph.output)]
    assert [(t.name, t.dtype, list(t.shape)) for t in (*spec.inputs, *spec.outputs)] == [
        ("ids", "int64", ["batch", 16]), ("prompt_emb", "float32", ["batch", 16, 384])]
    assert io == [("ids", onnx.TensorProto.INT64, ["batch", "tokens"]),
                  ("prompt_emb", onnx.TensorProto.FLOAT, ["batch", "tokens", 384])]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["encoder_sha256"] == TextPromptEncoder().encoder_sha256


def test_builder_bytes_are_deterministic(built, tmp_path):
    again = tmp_path / "again.onnx"
    write_text_encoder_onnx(again)
    assert sha256_file(again) == sha256_file(built) == expected_sha256()


def test_builder_before_opset_17_decomposes_layer_norm(tmp_path):
    import onnx

    path = tmp_path / "opset14.onnx"
    write_text_encoder_onnx(path, opset=14)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "LayerNormalization" not in ops and "ReduceMean" in ops
    cos, err, padding_zero = _agreement(path, 16)
    assert cos > 0.999 and err < 1e-3 and padding_zero, (cos, err, padding_zero)
    assert expected_sha256(14) is None  # pinned for the default opset only


def test_builder_refuses_an_unsupported_opset(tmp_path):
    from ntm_edge.errors import ConfigError

    with pytest.raises(ConfigError, match="opsets 14 .. 22"):
        write_text_encoder_onnx(tmp_path / "x.onnx", opset=13)
    assert not list(tmp_path.iterdir())


NO_TORCH_BUILD = FORBID_IMPORTS + r"""
import hashlib
from pathlib import Path

import numpy as np
import onnxruntime

from ntm_edge.runtime.text_graph import write_text_encoder_onnx

out = Path(sys.argv[1])
write_text_encoder_onnx(out)
ids = np.array([[101, 1037, 2192, 102, 0, 0]], dtype=np.int64)
emb = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
assert emb.shape == (1, 6, 384) and (emb[0, 4:] == 0).all() and np.isfinite(emb).all()
assert "torch" not in sys.modules and "transformers" not in sys.modules
print("BUILT", hashlib.sha256(out.read_bytes()).hexdigest())
"""


def test_builder_runs_without_torch(built, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", NO_TORCH_BUILD, str(tmp_path / "e.onnx")], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"BUILT {sha256_file(built)}" in r.stdout


def test_export_writes_the_builders_file(text_bundle, built):
    manifest = json.loads((text_bundle / "manifest.json").read_text())
    assert manifest["files"]["prompt_encoder.fp32.onnx"] == sha256_file(built)
    text = manifest["parity"]["text_encoder"]
    assert text["min_cosine"] > 0.999 and text["padding_zero"] and text["max_abs"] < 1e-3
