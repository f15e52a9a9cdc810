"""ntm_edge.calib: calibration data from real trajectories, FP16/INT8 and TensorRT engines.

Populated by the precision issue.

Layout: this is the repository's top-level `calib/` folder, installed as `ntm_edge.calib` by
pyproject.toml ([tool.setuptools.package-dir]); there is no `ntm_edge/calib/` folder. Its modules
import the core package absolutely (`from ntm_edge import schedule`) and each other relatively
(`from .<module> import ...`). `make typecheck` checks the tree laid out as installed.
"""
