"""ntm_edge.export: checkpoint -> ONNX bundle (one pure function per graph, IO specs as data).

Populated by the ONNX export issue; the package exists so the layout and the install are fixed.
"""
