"""`ntm-edge build-engines`: TensorRT engines from a bundle's ONNX files (strongly typed networks).

UNTESTED: TensorRT cannot be installed here (see runtime/tensorrt_backend.py); this is written against
the TensorRT 10 and 11 Python API and its tests skip with "TensorRT is not installable here".

- Strongly typed networks only (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): the precision comes
  from the ONNX file (fp16 casts, Q/DQ nodes). No builder precision flags and no implicit INT8
  calibration: TensorRT 11 removed both, and JetPack 6's TensorRT 10 builds strongly typed networks too.
- One optimisation profile per engine from the IO spec's (min, opt, max): static by default (all three
  at opt), ``dynamic=True`` for the spec's range.
- The timing cache is kept in the bundle (engines/timing.trt<version>.sm<cc>.cache), read before and
  written after every build, so rebuilding on the same GPU is fast.
- Engine files carry the TensorRT version and the GPU's compute capability in their names, and
  engines.json records the sha256 of the ONNX file each came from: an engine built for another
  TensorRT, another GPU or another ONNX file is rebuilt, never reused because its file exists.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..fileio import atomic_write, atomic_write_text
from ..runtime.bundle import load_bundle
from ..runtime.precision import held
from ..runtime.tensorrt_backend import (
    ENGINE_DIR,
    ENGINE_INDEX,
    compute_capability,
    engine_name,
    import_tensorrt,
    profile_shapes,
    timing_cache_name,
)

WORKSPACE_MB = 1024


def build_engines(bundle_path, precisions: list[str] | None = None, dynamic: bool = False,
                  workspace_mb: int = WORKSPACE_MB, device: int = 0, log=print) -> dict:
    """Build (or keep, when up to date) the engine of every graph at every precision -> engines.json."""
    bundle = load_bundle(bundle_path)
    have = held(bundle)
    precisions = precisions or have
    for p in precisions:
        if p not in have:
            raise ConfigError(f"bundle {bundle.root} has no {p} graphs (it holds {', '.join(have)})")
    trt, cudart = import_tensorrt()
    cc = compute_capability(cudart, device)
    root = bundle.root / ENGINE_DIR
    root.mkdir(exist_ok=True)
    index_path = root / ENGINE_INDEX
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"engines": {}}
    cache_path = root / timing_cache_name(trt.__version__, cc)
    logger = trt.Logger(trt.Logger.WARNING)
    for precision in precisions:
        for graph, entry in bundle.manifest["graphs"].items():
            variant = entry["variants"][precision]
            runs, onnx_file = variant.get("runs", precision), variant["file"]
            name = engine_name(graph, runs, trt.__version__, cc)
            record = {"graph": graph, "precision": runs, "onnx": onnx_file, "onnx_sha256": bundle.manifest["files"][onnx_file],
                      "tensorrt": trt.__version__, "compute_capability": list(cc), "static": not dynamic}
            if index["engines"].get(name) == record and (root / name).is_file():
                log(f"{name}: up to date")
                continue
            plan = _build(trt, logger, bundle.root / onnx_file, bundle.graphs[graph], dynamic, workspace_mb, cache_path)
            atomic_write(root / name, lambda tmp, plan=plan: Path(tmp).write_bytes(plan))
            index["engines"][name] = record
            atomic_write_text(index_path, json.dumps(index, indent=2))  # after each engine: an interrupted build keeps the rest
            log(f"{name}: built ({len(plan) / 2**20:.1f} MiB, {'dynamic' if dynamic else 'static'} shapes)")
    return index


def _build(trt, logger, onnx_path, spec, dynamic: bool, workspace_mb: int, cache_path) -> bytes:
    """One strongly typed engine from one ONNX file -> the serialized plan."""
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    dynamic_inputs = {t.name for t in spec.inputs if t.dynamic_axes}
    for name, (lo, opt, hi) in profile_shapes(spec, dynamic).items():
        if name in dynamic_inputs:  # the ONNX dims are symbolic only there
            profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ConfigError(f"TensorRT could not build an engine for {onnx_path.name} (see its log above)")
    cache_bytes = bytes(config.get_timing_cache().serialize())
    atomic_write(cache_path, lambda tmp: Path(tmp).write_bytes(cache_bytes))
    return bytes(plan)
