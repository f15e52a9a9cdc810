"""FP16 with fp32 islands: one simplified fp32 graph -> its fp16 twin, inputs and outputs kept float32.

The conversion is onnxruntime's float16 converter (``onnxruntime.transformers``: Microsoft's maintained
fork of onnxconverter-common's ``convert_float_to_float16``), driven by the island list
(``ntm_edge.islands``): the island op types join the converter's default op block list, the island
nodes are its node block list. ``OnnxModel.convert_float_to_float16`` then removes the Cast pairs the
converter leaves between two fp32 nodes (fp32 -> fp16 -> fp32), so values flowing from one island to
the next are never rounded to fp16 on the way. onnxconverter-common 1.16 itself cannot convert these
graphs: its Cast clean-up raises ("The downstream node of the second cast node should be graph
output") whenever an fp32 island produces a graph output, which every graph here does.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from ..islands import island_nodes, island_op_types


def convert_fp16(src: Path, dst: Path) -> dict:
    """Write the fp16 twin of the ONNX file ``src`` to ``dst`` -> {"island_nodes", "casts", "nodes"}."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    blocked = island_nodes(model.graph.node)
    om = OnnxModel(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number ... will be truncated": weights below fp16's range
        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
        om.convert_float_to_float16(use_symbolic_shape_infer=False, keep_io_types=True,
                                    op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(island_op_types())),
                                    node_block_list=blocked)
    om.topological_sort()
    onnx.checker.check_model(om.model, full_check=True)
    onnx.save(om.model, str(dst))
    return {"island_nodes": len(blocked), "casts": sum(n.op_type == "Cast" for n in om.model.graph.node),
            "nodes": len(om.model.graph.node)}
