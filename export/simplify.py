"""Simplify every exported graph before any precision pass, with onnxslim (a maintained tool, not our own
rewriter): constant folding, the shape arithmetic of the traced reshapes (Shape/Gather/Unsqueeze/Concat
chains), identity and no-op Cast removal, dead nodes, MatMul + Add -> Gemm. The simplified file
replaces the traced one; the exporter checks it with onnx.checker and then checks its parity against
torch, so a simplification that changed the function cannot reach a bundle.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

# the op types whose counts the export log reports (the traced graphs' shape arithmetic)
REPORTED = ("Constant", "Shape", "Unsqueeze", "Gather")


def op_counts(model) -> dict[str, int]:
    """Nodes per op type of an onnx ModelProto, most frequent first."""
    return dict(Counter(n.op_type for n in model.graph.node).most_common())


def simplify_file(path: Path) -> dict:
    """Simplify the ONNX file at ``path`` in place -> {"before": op counts, "after": op counts}."""
    import onnx
    import onnxslim

    model = onnx.load(str(path))
    slim = onnxslim.slim(model)
    onnx.checker.check_model(slim, full_check=True)
    onnx.save(slim, str(path))
    return {"before": op_counts(model), "after": op_counts(slim)}


def summary(per_graph: dict[str, dict]) -> str:
    """One line: total nodes before -> after, and the reported op types."""

    def total(key: str, op: str | None = None) -> int:
        return sum(v[key].get(op, 0) if op else sum(v[key].values()) for v in per_graph.values())

    ops = ", ".join(f"{op} {total('before', op)} -> {total('after', op)}" for op in REPORTED)
    return f"simplified with onnxslim: {total('before')} -> {total('after')} nodes in {len(per_graph)} graphs ({ops})"
