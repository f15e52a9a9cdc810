"""Static checks of every graph file of a bundle against what TensorRT builds as a strongly typed network.

TensorRT cannot be installed here, so what can be checked without it is checked on the ONNX files:

- every node's op is in the TensorRT ONNX parser's supported-op table (calib/trt_ops.py, naming the
  TensorRT version it comes from), for the types its data input has, and the opset is in its range;
- Q/DQ: int8 on the quantized side, zero-points 0 (TensorRT's explicit quantization is symmetric),
  scales finite and positive, no int32 bias DequantizeLinear (TensorRT dequantizes int8/fp8/int4 only);
- no mixed precision that a strongly typed network rejects: the inputs that share one type in an
  op (both operands of Add/Mul/MatMul, a Conv's input, weights and bias, a norm's scale, Where's
  branches, ...) have one float type, as TensorRT inserts no implicit casts in that mode;
- shapes are static where the IO spec says so: a dimension the spec gives as a number is that
  number in the file, a named (dynamic) one is symbolic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.bundle import Bundle
from ..runtime.specs import GraphSpec
from .trt_ops import OPSET_RANGE, SUPPORTED_OPS, TENSORRT_VERSION

# the input whose type the table's "Supported Types" column is about (default: input 0)
_DATA_INPUT: dict[str, int | None] = {"Where": 1, "Constant": None, "ConstantOfShape": None}
# op -> indices of inputs that must share one float type (None: all inputs)
_SAME_TYPE: dict[str, tuple[int, ...] | None] = {
    op: None for op in ("Add", "Sub", "Mul", "Div", "MatMul", "Gemm", "Conv", "Concat", "Sum", "Max",
                                  "Min", "Mean", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual")}
_SAME_TYPE.update({"Where": (1, 2), "InstanceNormalization": None, "LayerNormalization": None,
                   "GroupNormalization": None, "BatchNormalization": None, "Clip": None, "PRelu": None})
_FLOATS = {"FP32", "FP16", "BF16"}


def _trt_type(elem_type: int) -> str:
    import onnx

    names: dict[int, str] = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
             onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.INT32: "INT32",
             onnx.TensorProto.INT64: "INT64", onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.DOUBLE: "DOUBLE"}
    return names.get(elem_type, onnx.TensorProto.DataType.Name(elem_type))


def _types(model) -> dict[str, str]:
    """Tensor name -> TensorRT type name, after ONNX shape inference."""
    import onnx

    typed = onnx.shape_inference.infer_shapes(model)
    g = typed.graph
    out = {v.name: _trt_type(v.type.tensor_type.elem_type) for v in (*g.input, *g.output, *g.value_info)}
    out.update({t.name: _trt_type(t.data_type) for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            out[n.output[0]] = _trt_type(n.attribute[0].t.data_type)
    return out


def _qdq_problems(node, consts: dict[str, np.ndarray], types: dict[str, str]) -> list[str]:
    scale = consts.get(node.input[1])
    zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    quantized, real = (node.output[0], node.input[0]) if node.op_type == "QuantizeLinear" else (node.input[0], node.output[0])
    problems = []
    if types.get(quantized) != "INT8":
        problems.append(f"{node.op_type} {node.name} has a {types.get(quantized)} quantized side, not INT8")
    if types.get(real) not in _FLOATS:
        problems.append(f"{node.op_type} {node.name} has a {types.get(real)} real side, not a float type")
    if scale is None or not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        problems.append(f"{node.op_type} {node.name}: scale not a constant that is finite and positive")
    if zp is not None and np.any(zp != 0):
        problems.append(f"{node.op_type} {node.name}: zero-point not 0")
    return problems


def _shape_problems(model, spec: GraphSpec) -> list[str]:
    problems = []
    values = {v.name: v for v in (*model.graph.input, *model.graph.output)}
    for t in (*spec.inputs, *spec.outputs):
        dims = values[t.name].type.tensor_type.shape.dim
        if len(dims) != len(t.shape):
            problems.append(f"{t.name} has rank {len(dims)}, its spec {len(t.shape)}")
            continue
        for i, (d, want) in enumerate(zip(dims, t.shape, strict=True)):
            if isinstance(want, int) and not (d.HasField("dim_value") and d.dim_value == want):
                problems.append(f"{t.name} axis {i} is not static {want} as its spec says")
            if isinstance(want, str) and not d.HasField("dim_param"):
                problems.append(f"{t.name} axis {i} is static, its spec says dynamic {want!r}")
    return problems


def graph_problems(path: Path, spec: GraphSpec) -> tuple[list[str], dict[str, int]]:
    """Problems TensorRT would have with one ONNX file (empty: none found), and its op counts."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    problems = [] if OPSET_RANGE[0] <= opset <= OPSET_RANGE[1] else [f"opset {opset} is outside {OPSET_RANGE}"]
    types = _types(model)
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"})
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
            problems.append(f"{node.op_type} ({node.name}) is not in TensorRT {TENSORRT_VERSION}'s ONNX parser table")
            continue
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems += _qdq_problems(node, consts, types)
            continue
        data = _DATA_INPUT.get(node.op_type, 0)
        dtype = types.get(node.output[0] if data is None else node.input[data])
        if dtype not in SUPPORTED_OPS[node.op_type]:
            problems.append(f"{node.op_type} ({node.name}) on {dtype}: TensorRT {TENSORRT_VERSION} supports "
                            f"{', '.join(sorted(SUPPORTED_OPS[node.op_type]))}")
        if node.op_type in _SAME_TYPE:
            idx = _SAME_TYPE[node.op_type] or range(len(node.input))
            floats = {types.get(node.input[i], "") for i in idx if i < len(node.input) and node.input[i]} & _FLOATS
            if len(floats) > 1:
                problems.append(f"{node.op_type} ({node.name}) mixes {' and '.join(sorted(floats))} inputs: "
                                f"a strongly typed network rejects it")
    return problems + _shape_problems(model, spec), counts


def check_bundle(bundle: Bundle) -> dict:
    """Check every file of every graph -> {"tensorrt": version, "files": {file: {"problems", "ops"}}}."""
    files: dict[str, dict] = {}
    for name, entry in bundle.manifest["graphs"].items():
        for variant in entry["variants"].values():
            if variant["file"] not in files:
                problems, counts = graph_problems(bundle.root / variant["file"], bundle.graphs[name])
                files[variant["file"]] = {"problems": problems, "ops": counts}
    return {"tensorrt": TENSORRT_VERSION, "opset_range": list(OPSET_RANGE), "files": files,
            "passed": all(not f["problems"] for f in files.values())}

