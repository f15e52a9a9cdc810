"""Native TensorRT backend of the runtime (`--provider tensorrt`): the engines that `ntm-edge build-engines`
wrote into the bundle, run through the TensorRT and cuda-python APIs. Torch-free.

UNTESTED: TensorRT cannot be installed on any machine this project is tested on (PyPI's tensorrt
packages fetch from NVIDIA's index, and no lent GPU machine has it). The code is written against the
TensorRT 10 and 11 Python API (named tensors, ``execute_async_v3``, strongly typed engines) and
cuda-python's runtime API; its tests skip with "TensorRT is not installable here". What is checked
here: the engine naming and staleness rules, the optimisation profiles, the batch padding (pure
functions below, tested), and the ONNX files the engines are built from (calib/trt_check.py).

- Engines live in BUNDLE/engines/, named ``<graph>.<precision>.trt<version>.sm<major><minor>.engine``, and
  ``engines.json`` records for each the sha256 of the ONNX file it was built from. An engine whose
  TensorRT version, GPU compute capability or ONNX file does not match is stale: it is never loaded.
- ``TensorRTGraph`` binds device buffers once per input shape; the first call at a shape runs the engine
  once and captures the next ``execute_async_v3`` in a CUDA graph; every later call copies the inputs
  in, replays the graph, and copies the outputs out. The unrolled ``sampler_loop`` engine is the whole
  four-step loop, so `ntm-edge run --provider tensorrt` replays the four steps as one CUDA graph.
- Engines are static by default (built for the spec's opt batch): a smaller batch is padded up to it
  and the outputs sliced back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .bundle import ENGINE_DIR, Bundle, BundleError
from .specs import GraphSpec

ENGINE_INDEX = "engines.json"
NOT_INSTALLED = ("TensorRT engines (build-engines, --provider tensorrt) need the tensorrt and cuda-python packages "
                 "(NVIDIA's index; JetPack ships them), which are not installed here")


def engine_name(graph: str, precision: str, trt_version: str, compute_capability: tuple[int, int]) -> str:
    """File name of one engine: the graph, the precision it runs in, the TensorRT version, the GPU."""
    return f"{graph}.{precision}.trt{trt_version}.sm{compute_capability[0]}{compute_capability[1]}.engine"


def timing_cache_name(trt_version: str, compute_capability: tuple[int, int]) -> str:
    return f"timing.trt{trt_version}.sm{compute_capability[0]}{compute_capability[1]}.cache"


def profile_shapes(spec: GraphSpec, dynamic: bool = False) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every input, from the IO spec. Static (the default): all three at opt."""
    out = {}
    for t in spec.inputs:
        shapes = tuple(t.resolve({d: v[i] for d, v in spec.dims.items()}) for i in range(3))
        out[t.name] = shapes if dynamic else (shapes[1],) * 3
    return out


def pad_batch(inputs: dict[str, np.ndarray], spec: GraphSpec, batch: int) -> tuple[dict[str, np.ndarray], int]:
    """Pad every input whose axis 0 is the batch axis up to ``batch`` rows (repeating the last row)
    -> (inputs, the real batch)."""
    batched = [t.name for t in spec.inputs if t.dynamic_axes.get(0) == "batch"]
    n = len(inputs[batched[0]]) if batched else batch
    if n > batch:
        raise ConfigError(f"graph {spec.name} was built for batches of at most {batch}, got {n}")
    out = dict(inputs)
    for name in batched:
        a = inputs[name]
        out[name] = a if n == batch else np.concatenate([a, np.repeat(a[-1:], batch - n, axis=0)])
    return out, n


def unpad(outputs: dict[str, np.ndarray], spec: GraphSpec, n: int) -> dict[str, np.ndarray]:
    return {t.name: outputs[t.name][:n] if t.dynamic_axes.get(0) == "batch" else outputs[t.name] for t in spec.outputs}


def read_index(bundle: Bundle) -> dict:
    path = bundle.root / ENGINE_DIR / ENGINE_INDEX
    if not path.is_file():
        raise BundleError(f"{bundle.root} has no TensorRT engines; build them with "
                          f"`ntm-edge build-engines --bundle {bundle.root}`")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BundleError(f"{path} is corrupt; rebuild the engines with `ntm-edge build-engines`") from None


def find_engine(bundle: Bundle, index: dict, graph: str, precision: str, trt_version: str,
                compute_capability: tuple[int, int]) -> Path:
    """The engine of ``graph`` at bundle precision ``precision`` for this TensorRT and GPU; BundleError if it
    is missing or stale (other TensorRT version, other GPU, or built from another ONNX file)."""
    variant = bundle.manifest["graphs"][graph]["variants"][precision]
    name = engine_name(graph, variant.get("runs", precision), trt_version, compute_capability)
    entry = index.get("engines", {}).get(name)
    onnx_sha = bundle.manifest["files"][variant["file"]]
    if entry is None or entry.get("onnx_sha256") != onnx_sha or not (bundle.root / ENGINE_DIR / name).is_file():
        raise BundleError(f"no up-to-date TensorRT {trt_version} engine for {graph} ({precision}) on "
                          f"sm_{compute_capability[0]}{compute_capability[1]}; run `ntm-edge build-engines --bundle "
                          f"{bundle.root} --precision {precision}`")
    return bundle.root / ENGINE_DIR / name


def import_tensorrt():
    """(tensorrt, cuda-python's runtime module), imported lazily; ConfigError if either is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise ConfigError(NOT_INSTALLED) from None
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise ConfigError(NOT_INSTALLED) from None
    return trt, cudart


def check_cuda(result):
    """cuda-python returns (error, *values): raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else tuple(values)


def compute_capability(cudart, device: int = 0) -> tuple[int, int]:
    props = check_cuda(cudart.cudaGetDeviceProperties(device))
    return int(props.major), int(props.minor)


class TensorRTBackend:
    """The engines of one bundle at one precision, on one GPU, sharing one CUDA stream."""

    def __init__(self, bundle: Bundle, precision: str, device: int = 0):
        self.trt, self.cudart = import_tensorrt()
        check_cuda(self.cudart.cudaSetDevice(device))
        self.bundle, self.precision = bundle, precision
        self.cc = compute_capability(self.cudart, device)
        self.index = read_index(bundle)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.stream = check_cuda(self.cudart.cudaStreamCreate())

    def graph(self, name: str) -> TensorRTGraph:
        path = find_engine(self.bundle, self.index, name, self.precision, self.trt.__version__, self.cc)
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BundleError(f"{path} cannot be deserialized by TensorRT {self.trt.__version__}; rebuild it")
        static = self.index["engines"][path.name].get("static", True)
        return TensorRTGraph(self, self.bundle.graphs[name], engine, static)


class TensorRTGraph:
    """One engine as a callable like ``session.Graph``: ``graph(name=array, ...) -> {output: array}``."""

    def __init__(self, backend: TensorRTBackend, spec: GraphSpec, engine, static: bool):
        self.backend, self.spec, self.engine = backend, spec, engine
        self.context = engine.create_execution_context()
        self.static_batch = profile_shapes(spec)[spec.inputs[0].name][1][0] if static else None
        self._bound: dict | None = None  # shapes -> (device buffers, host outputs, CUDA graph exec)
        self.providers = ["TensorRT (native)"]

    def _bind(self, shapes: dict[str, tuple[int, ...]]):
        """Allocate device buffers for these input shapes, set them on the context, run once, capture."""
        trt, cudart, stream = self.backend.trt, self.backend.cudart, self.backend.stream
        self._release()
        buffers, outputs = {}, {}
        for name, shape in shapes.items():
            self.context.set_input_shape(name, shape)
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
            buffers[name] = (check_cuda(cudart.cudaMalloc(nbytes)), shape, dtype, nbytes)
            self.context.set_tensor_address(name, int(buffers[name][0]))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                outputs[name] = np.empty(shape, dtype=dtype)
        self.context.execute_async_v3(stream)  # the first enqueue applies deferred shape updates
        check_cuda(cudart.cudaStreamSynchronize(stream))
        check_cuda(cudart.cudaStreamBeginCapture(stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        self.context.execute_async_v3(stream)
        graph = check_cuda(cudart.cudaStreamEndCapture(stream))
        exec_ = check_cuda(cudart.cudaGraphInstantiate(graph, 0))
        check_cuda(cudart.cudaGraphDestroy(graph))
        self._bound = {"shapes": shapes, "buffers": buffers, "outputs": outputs, "exec": exec_}

    def _release(self) -> None:
        if self._bound is None:
            return
        cudart = self.backend.cudart
        check_cuda(cudart.cudaGraphExecDestroy(self._bound["exec"]))
        for ptr, *_ in self._bound["buffers"].values():
            check_cuda(cudart.cudaFree(ptr))
        self._bound = None

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        cudart, stream = self.backend.cudart, self.backend.stream
        feed = {t.name: np.ascontiguousarray(inputs[t.name], dtype=np.dtype(t.dtype)) for t in self.spec.inputs}
        n = None
        if self.static_batch is not None:
            feed, n = pad_batch(feed, self.spec, self.static_batch)
        shapes = {name: a.shape for name, a in feed.items()}
        if self._bound is None or self._bound["shapes"] != shapes:
            self._bind(shapes)
        assert self._bound is not None
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, a in feed.items():
            ptr, _, _, nbytes = self._bound["buffers"][name]
            check_cuda(cudart.cudaMemcpyAsync(ptr, a.ctypes.data, nbytes, h2d, stream))
        check_cuda(cudart.cudaGraphLaunch(self._bound["exec"], stream))
        for name, host in self._bound["outputs"].items():
            ptr, _, _, nbytes = self._bound["buffers"][name]
            check_cuda(cudart.cudaMemcpyAsync(host.ctypes.data, ptr, nbytes, d2h, stream))
        check_cuda(cudart.cudaStreamSynchronize(stream))
        outputs = {name: host.copy() for name, host in self._bound["outputs"].items()}
        return unpad(outputs, self.spec, n) if n is not None else outputs

    def __del__(self):
        try:
            self._release()
        except Exception:  # interpreter shutdown: the CUDA context may be gone already
            pass
