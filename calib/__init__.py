"""ntm_edge.calib: calibration data from real trajectories, FP16/INT8 and TensorRT engines.

Populated by the precision issue.
"""
