"""INT8: one simplified fp32 graph -> its Q/DQ twin, with ``onnxruntime.quantization.quantize_static``.

Settings (what TensorRT's strongly typed INT8 needs, docs/design.md 7): QDQ format; int8 activations and
weights, both symmetric (every zero-point 0); per-channel weights; ranges from the calibration
method (minmax | entropy | percentile) on real trajectories (calib/capture.py). The islands
(``ntm_edge.islands``) are excluded.

Which nodes: Conv, MatMul and Gemm outside the islands whose data input is an activation computed in
the graph and read only by nodes of that kind (and, for MatMul/Gemm, whose weight is a constant). Two
reasons, both measured on the `small` predictor (README, "Precisions"):

- onnxruntime's quantizer reroutes every reader of a quantized tensor through its DequantizeLinear, so
  an island reading the same tensor (the posterior reading u_t, a norm reading the residual stream)
  would read int8-rounded values;
- onnxruntime's CPU graph optimizer fuses DequantizeLinear -> Conv -> QuantizeLinear into one
  QLinearConv only when the DequantizeLinear feeds quantized nodes alone; one shared with an fp32
  reader leaves an fp32 Conv between a Q and a DQ, slower than no quantization at all. Quantizing
  "every op" leaves the norms and activations between the convolutions as Q/DQ round trips with
  nothing to fuse.

In the U-Net this selects both 3x3 convolutions of every residual block (over 90% of its multiply-adds)
and the FiLM projections of the condition vector (they read it together: small compute, a fifth of the
weights); the stem (reads u_t), the strided and 1x1 skip convolutions (read the residual stream next to
a norm or the U-Net's skip concatenation) stay fp32.

``calibration_cache``: the ranges are cached as JSON (onnxruntime's ``calibration_cache_path``) under
$NTM_EDGE_CACHE/calib/<key>/, the key being a hash of the checkpoint's weights, the fp32 graph and the
calibration settings; a re-export with the same key skips the capture and the calibration runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..islands import island_nodes, island_of

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
CAPTURE_VERSION = 1  # bump when calib/capture.py changes what it feeds


def quantizable_nodes(model) -> list[str]:
    """Names of the nodes to quantize in an onnx ModelProto (see the module docstring)."""
    produced = {o for n in model.graph.node for o in n.output}
    constants = {t.name for t in model.graph.initializer}

    def candidate(n) -> bool:
        return (n.op_type in QUANTIZED_OPS and island_of(n.op_type, n.name) is None and n.input[0] in produced
                and (n.op_type == "Conv" or n.input[1] in constants))

    readers: dict[str, list] = {}
    for n in model.graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    return [n.name for n in model.graph.node if candidate(n) and all(candidate(r) for r in readers[n.input[0]])]


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of input dicts."""

    def __init__(self, batches):
        self._it = iter(batches)

    def get_next(self):
        return next(self._it, None)


def graph_fingerprint(path: Path) -> str:
    """sha256 of a graph's nodes and initializers, in order (the file's bytes also hold value-info
    whose order varies between exports of the same graph)."""
    import onnx

    model = onnx.load(str(path))
    h = hashlib.sha256()
    for part in (*model.graph.node, *model.graph.initializer, *model.graph.input, *model.graph.output):
        h.update(part.SerializeToString(deterministic=True))
    return h.hexdigest()


def calibration_key(weights_sha256: str, graphs: dict[str, str], settings: dict) -> str:
    """Key of one bundle's calibration: weights, the fp32 graphs (name -> fingerprint), settings, versions."""
    import onnxruntime

    payload = {"weights": weights_sha256, "graphs": graphs, "settings": settings, "capture": CAPTURE_VERSION,
               "onnxruntime": onnxruntime.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def calibration_dir(key: str) -> Path:
    root = Path(os.environ.get("NTM_EDGE_CACHE") or Path.home() / ".cache" / "ntm-edge").expanduser()
    return root / "calib" / key


def quantize_int8(src: Path, dst: Path, batches, method: str, cache: Path) -> dict:
    """Write the Q/DQ twin of ``src`` to ``dst``. ``batches``: calibration input dicts, or None when the
    ranges are cached in ``cache`` (onnxruntime's calibration cache JSON) -> {"quantized", "nodes"}."""
    import onnx

    model = onnx.load(str(src))
    nodes = quantizable_nodes(model)
    if not nodes:  # nothing worth quantizing: the graph stays as it is
        onnx.save(model, str(dst))
        return {"quantized": 0, "nodes": len(model.graph.node)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    root_logger, level = logging.getLogger(), logging.getLogger().level
    root_logger.setLevel(logging.ERROR)  # quantize_static logs "consider pre-processing" as a warning
    try:
        _quantize(src, dst, batches, method, cache, nodes, island_nodes(model.graph.node))
    finally:
        root_logger.setLevel(level)
    q = onnx.load(str(dst))
    onnx.checker.check_model(q, full_check=True)
    return {"quantized": len(nodes), "nodes": len(q.graph.node)}


def _quantize(src, dst, batches, method: str, cache: Path, nodes: list[str], islands: list[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(src), str(dst), None if batches is None else _Reader(batches), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, reduce_range=False,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
        nodes_to_exclude=islands, calibrate_method=getattr(CalibrationMethod, METHODS[method]),
        calibration_cache_path=cache,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibTensorRangeSymmetric": True,
                       "MatMulConstBOnly": True, "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                       "QuantizeBias": False})
