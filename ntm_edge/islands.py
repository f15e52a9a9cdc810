"""The fp32 islands: what stays float32 in every precision, as data (docs/design.md 7). Torch-free.

One list, read by every precision path:

- the torch model: the modules an island names are ``layers.FP32Island`` classes (fp32 under
  autocast; a test pins every norm, embedding and last projection of every preset to this list), and
  the exp/log of log-scales go through ``layers.at_least_fp32``;
- the FP16 conversion (``ntm_edge.calib.fp16``): the float16 converter's op and node block lists;
- the INT8 quantization (``ntm_edge.calib.int8``): ``quantize_static``'s ``nodes_to_exclude``;
- the TensorRT checks (``ntm_edge.calib.trt_check``): island nodes must compute in float32.

ONNX nodes are matched by op type and by the module path that the TorchScript exporter writes into
node names ("/predictor/backbone/down.0/norm1/InstanceNormalization" -> "predictor.backbone.down.0.norm1";
a repeated call adds "_1", "_2" to a scope, which is dropped). ``modules`` patterns match any component
of the path (everything inside that module); ``scopes`` patterns match the whole path (only the ops
written directly in that module's forward, not its submodules).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Island:
    name: str
    why: str
    op_types: tuple[str, ...] = ()  # every ONNX node of these op types
    modules: tuple[str, ...] = ()  # regexes, fullmatch on any component of a node's module path
    scopes: tuple[str, ...] = ()  # regexes, fullmatch on a node's whole (dotted) module path


ISLANDS: tuple[Island, ...] = (
    Island("norms", "a mean and variance over hundreds of elements: in fp16 the squares overflow and the variance "
           "cancels; their outputs span a range that int8 cannot hold",
           op_types=("LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization"),
           modules=(r"\w*norm\d*",)),
    Island("softmax", "exp of attention scores and its normalising sum", op_types=("Softmax",)),
    Island("log-scales", "exp/log of the transporter's alpha and the predictor's log_sigma and d: the likelihood reads "
           "them directly, and an fp16 exp overflows past 11", op_types=("Exp", "Log")),
    Island("time and level embeddings", "Fourier features of t, s and 1/T at frequencies up to 1000 radians per unit: "
           "fp16 rounding of t shifts their phase by whole radians", op_types=("Sin", "Cos"), modules=(r"condition",)),
    Island("last projections", "the outputs: x0-hat / v and d (predictor), mu and alpha (transporter blocks), x0 "
           "(denoiser); their errors go straight into samples and likelihoods", modules=(r"out",)),
    Island("flow and sampler arithmetic", "what the graphs compute around the networks, elementwise and cheap: the "
           "posterior mu_P = A u_t + B x0-hat and log_sigma = log C + d, the soft clamps, the affine flow update "
           "and its log-det sum, guidance (C.5) and u = mu + sigma z, whose levels every later step reads",
           scopes=(r"", r"(.*\.)?predictor", r"(.*\.)?transporter", r"(.*\.)?blocks\.\d+")),
)

_REPEAT = re.compile(r"_\d+$")


def module_path(node_name: str) -> str | None:
    """The dotted module path of an ONNX node named by the TorchScript exporter, "" for the graph's top
    level; None for a node that a tool inserted (its name does not start with "/")."""
    if not node_name.startswith("/"):
        return None
    parts = node_name.split("/")[1:-1]  # drop the leading "" and the op name
    return ".".join(_REPEAT.sub("", p) for p in parts)


def island_of(op_type: str, node_name: str) -> Island | None:
    """The island an ONNX node belongs to, or None."""
    path = module_path(node_name)
    components = [] if path is None else path.replace(".", " ").split()
    for island in ISLANDS:
        if op_type in island.op_types:
            return island
        if any(re.fullmatch(p, c) for p in island.modules for c in components):
            return island
        if path is not None and any(re.fullmatch(p, path) for p in island.scopes):
            return island
    return None


def island_nodes(nodes: Iterable) -> list[str]:
    """Names of the island nodes among ONNX ``NodeProto``s (anything with ``op_type`` and ``name``)."""
    return [n.name for n in nodes if island_of(n.op_type, n.name) is not None]


def island_op_types() -> list[str]:
    """Every op type that is an island wherever it appears."""
    return sorted({op for island in ISLANDS for op in island.op_types})


def is_island_module(qualified_name: str) -> bool:
    """A torch module (``named_modules`` name) that an island names as a whole: its last component
    matches a ``modules`` pattern. Such a module must be a ``layers.FP32Island``."""
    last = qualified_name.rsplit(".", 1)[-1]
    return any(re.fullmatch(p, last) for island in ISLANDS for p in island.modules)
