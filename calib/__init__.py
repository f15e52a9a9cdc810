"""ntm_edge.calib: the precision passes of `ntm-edge export --fp16 --int8` and TensorRT engines.

    policy.py      options, and which precision each graph runs in (data)
    fp16.py        FP16 with the fp32 islands of ``ntm_edge.islands``, IO kept float32
    capture.py     calibration inputs from real trajectories (torch side)
    int8.py        INT8 Q/DQ with onnxruntime's quantize_static, the calibration cache
    quality.py     the quality gate: each precision against fp32 on identical noise
    trt_ops.py     the TensorRT ONNX parser's supported-op table (data, with its TensorRT version)
    trt_check.py   static checks of every graph against what a strongly typed TensorRT network accepts
    engines.py     `ntm-edge build-engines` (TensorRT; untested here: TensorRT is not installable)
    build.py       runs the passes on a bundle being exported

Importing the package imports nothing heavy; the modules import onnx, onnxruntime, torch or TensorRT
where they need them.

Layout: this is the repository's top-level `calib/` folder, installed as `ntm_edge.calib` by
pyproject.toml ([tool.setuptools.package-dir]); there is no `ntm_edge/calib/` folder. Its modules
import the core package absolutely (`from ntm_edge import schedule`) and each other relatively
(`from .<module> import ...`). `make typecheck` checks the tree laid out as installed.
"""
