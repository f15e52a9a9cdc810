"""ntm_edge.runtime: the torch-free runtime (numpy + onnxruntime or TensorRT).

Never imports torch. Populated by the runtime issue.
"""
