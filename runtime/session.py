"""onnxruntime sessions over a bundle's graphs: execution providers, named inputs checked against the
graph's IO spec, one clear error for a graph that will not load. numpy + onnxruntime only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ntm_edge import validate
from ntm_edge.errors import ConfigError

from .bundle import Bundle, BundleError, load_bundle
from .specs import GraphSpec

# Execution providers in order of preference; `auto` takes the first that this onnxruntime has and
# keeps the ones after it as fallbacks (onnxruntime places nodes a provider cannot run on the next).
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
PROVIDER_ORDER = ("tensorrt", "cuda", "cpu")
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("the runtime needs onnxruntime: pip install 'ntm-edge[runtime]' "
                          "(or onnxruntime-gpu for CUDA / TensorRT)") from None
    return onnxruntime


def available_providers() -> list[str]:
    """Short names ("tensorrt", "cuda", "cpu") of the providers this onnxruntime offers, best first."""
    have = set(_ort().get_available_providers())
    return [p for p in PROVIDER_ORDER if PROVIDERS[p] in have]


def choose_providers(requested: str | None = None) -> list[str]:
    """onnxruntime provider names: ``requested`` ("tensorrt" | "cuda" | "cpu") and the ones after it in
    ``PROVIDER_ORDER``, or for None / "auto" the best available first. CPU always ends the list."""
    have = available_providers()
    if requested in (None, "", "auto"):
        start = have[0]
    elif requested not in PROVIDERS:
        raise ConfigError(f"unknown provider {requested!r}; choose one of: auto, {', '.join(PROVIDER_ORDER)}")
    elif requested not in have:
        raise ConfigError(f"provider {requested!r} is not available in this onnxruntime "
                          f"(available: {', '.join(have)}); install onnxruntime-gpu for cuda / tensorrt")
    else:
        start = requested
    chosen = [p for p in PROVIDER_ORDER[PROVIDER_ORDER.index(start):] if p in have]
    return [PROVIDERS[p] for p in chosen]


def tensorrt_options(spec: GraphSpec, cache_dir) -> dict[str, str]:
    """onnxruntime's TensorRT provider options for one graph: the optimisation profile (min/opt/max shape
    of every input with a dynamic axis, read from the IO spec) and the engine and timing caches.
    Untested here (no TensorRT on this machine); the TensorRT issue replaces it with built engines."""

    def shapes(i: int) -> str:
        sizes = {d: v[i] for d, v in spec.dims.items()}
        return ",".join(f"{t.name}:{'x'.join(map(str, t.resolve(sizes)))}" for t in spec.inputs if t.dynamic_axes)

    return {"trt_profile_min_shapes": shapes(0), "trt_profile_opt_shapes": shapes(1), "trt_profile_max_shapes": shapes(2),
            "trt_engine_cache_enable": "True", "trt_timing_cache_enable": "True",
            "trt_engine_cache_path": str(cache_dir), "trt_timing_cache_path": str(cache_dir)}


def engine_cache_dir(bundle: Bundle) -> Path:
    """$NTM_EDGE_CACHE/trt/<bundle key> (default ~/.cache/ntm-edge): engines are keyed by the bundle's content."""
    root = Path(os.environ.get("NTM_EDGE_CACHE", Path.home() / ".cache" / "ntm-edge"))
    return root / "trt" / str(bundle.manifest.get("key", "unkeyed"))


def default_threads() -> int | None:
    """Intra-op threads: $OMP_NUM_THREADS when set (onnxruntime itself ignores it), bounded by the cores
    this process may use, else None (onnxruntime's own choice: one thread per physical core)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return min(int(value), validate.cpu_count()) if value.isdigit() and int(value) > 0 else None


class Graph:
    """One graph of a bundle as a callable: ``graph(name=array, ...) -> {output name: array}``."""

    def __init__(self, spec: GraphSpec, path, providers: list, threads: int | None = None):
        """providers: onnxruntime provider names, or (name, options) pairs, best first."""
        ort = _ort()
        self.spec = spec
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings from provider fallbacks are not the user's concern
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for invalid models
            msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
            raise BundleError(f"{path} cannot be loaded by onnxruntime ({msg}); re-export the bundle") from None
        names = [i.name for i in self.session.get_inputs()]
        if names != spec.input_names or [o.name for o in self.session.get_outputs()] != spec.output_names:
            raise BundleError(f"{path} does not have the inputs and outputs its manifest entry lists; re-export the bundle")
        for arg, tensor in zip((*self.session.get_inputs(), *self.session.get_outputs()), (*spec.inputs, *spec.outputs),
                               strict=True):
            _check_io(path, arg, tensor)
        self._dtypes = {t.name: NUMPY_DTYPES[t.dtype] for t in spec.inputs}

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        feed: dict[str, np.ndarray] = {name: np.ascontiguousarray(inputs[name], dtype=dtype)
                                       for name, dtype in self._dtypes.items()}
        return dict(zip(self.spec.output_names, self.session.run(None, feed), strict=True))


ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)", "bool": "tensor(bool)"}


def _check_io(path, arg, tensor) -> None:
    """One input or output of a loaded graph against its IO spec: dtype, rank and every size the graph
    fixes (a symbolic size in the graph fits anything; a fixed one must be the spec's static size)."""
    shape = list(arg.shape)
    fits = len(shape) == len(tensor.shape) and all(
        not isinstance(got, int) or got == want for got, want in zip(shape, tensor.shape, strict=True))
    if arg.type != ORT_TYPES[tensor.dtype] or not fits:
        raise BundleError(f"{path}: {tensor.name} is {arg.type} {shape} in the graph, but the manifest's IO spec says "
                          f"{tensor.dtype} {list(tensor.shape)}; re-export the bundle")


class Runtime:
    """A loaded bundle and its graphs (``runtime[name]``), each session created on first use with the
    chosen providers, thread count and precision. Everything else in the runtime is a function of it."""

    def __init__(self, bundle: Bundle, provider: str | None = None, threads: int | None = None,
                 precision: str = "fp32"):
        self.bundle, self.precision = bundle, precision
        # "tensorrt": the native engines of `ntm-edge build-engines` (runtime/tensorrt_backend.py, untested here);
        # "ort-tensorrt": onnxruntime's TensorRT execution provider
        self.native = provider == "tensorrt"
        if self.native:
            from .tensorrt_backend import import_tensorrt

            import_tensorrt()  # one clear error line when TensorRT is missing, before any work
            self.providers = ["TensorRT (native engines)"]
        else:
            self.providers = choose_providers("tensorrt" if provider == "ort-tensorrt" else provider)
        threads = validate.threads(threads)  # -1: all cores; more than the cores: bounded
        self.threads = default_threads() if threads is None else (threads or None)
        self._graphs: dict[str, Graph] = {}
        self._native_backend: Any = None  # a TensorRTBackend once a native graph is first used

    def __getitem__(self, name: str) -> Graph:
        if name not in self._graphs and self.native:
            from .tensorrt_backend import TensorRTBackend

            self._native_backend = self._native_backend or TensorRTBackend(self.bundle, self.precision)
            self._graphs[name] = self._native_backend.graph(name)
        if name not in self._graphs:
            path = self.bundle.file(name, self.precision)
            spec = self.bundle.graphs[name]
            providers: list = list(self.providers)
            if PROVIDERS["tensorrt"] in providers:
                cache = engine_cache_dir(self.bundle)
                cache.mkdir(parents=True, exist_ok=True)
                providers[0] = (providers[0], tensorrt_options(spec, cache))  # tensorrt is always first
            self._graphs[name] = Graph(spec, path, providers, self.threads)
        return self._graphs[name]

    def has(self, name: str) -> bool:
        return self.bundle.has(name, self.precision)

    @property
    def provider_name(self) -> str:
        """Short name ("tensorrt", "cuda", "cpu") of the provider the graphs run on first."""
        if self.native:
            return "tensorrt"
        return next(short for short, full in PROVIDERS.items() if full == self.providers[0])


def open_runtime(path, provider: str | None = None, threads: int | None = None, precision: str | None = "fp32") -> Runtime:
    """Load and verify the bundle at ``path`` (manifest, format version, sha256 of every file).
    ``precision`` None or "auto": the best the bundle holds for the provider (runtime/precision.py)."""
    from .precision import choose_precision

    bundle = load_bundle(path)
    rt = Runtime(bundle, provider, threads)
    rt.precision = choose_precision(bundle, rt.provider_name, precision)
    return rt
