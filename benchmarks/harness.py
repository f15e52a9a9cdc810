"""What the latency suite (bench_stages.py) runs for each backend, stage and batch size.

Backends:
- ``torch``: the library's eager torch on CPU, fp32 (the reference every ratio is taken against);
- ``torch-cuda-eager``: the same on CUDA; ``torch-cuda-fp32`` / ``torch-cuda-bf16``: the GPU path
  (ntm_edge/gpu.py: CUDA graphs, autocast). These skip on machines without CUDA;
- ``ort-<provider>-<precision>``: the torch-free runtime on onnxruntime, for each precision the bundle
  holds (its manifest's graph variants) and each provider (cpu; cuda and tensorrt skip where this
  onnxruntime lacks them).

Every stage is called through the public functions of the library and the runtime, on the same
inputs for every backend: prompts cycling over the classes, the sampler's own u_t0 (seed 0) for the
inversions and the denoiser, a forward trajectory of random images for the audit. Guidance 0.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from ntm_edge import flops, schedule
from ntm_edge.bench import BenchSetup, setup_from_env
from ntm_edge.decoding import segment_bounds
from ntm_edge.denoiser import has_denoiser, load_denoiser
from ntm_edge.exits import sample_images
from ntm_edge.model import NTM, Trajectory
from ntm_edge.runtime.audit import trajectory_nll
from ntm_edge.runtime.bundle import PRECISIONS, load_bundle
from ntm_edge.runtime.inversion import invert
from ntm_edge.runtime.sampler import StageTimer, denoise, draw_noise, encode, generate, predict, sample_levels
from ntm_edge.runtime.session import PROVIDERS, available_providers, open_runtime
from ntm_edge.runtime.specs import DENOISER, PREDICTOR_STEP, PROMPT_ENCODER, TRANSPORTER_FORWARD

STEPS = 4  # the sampler's T
GS_SEGMENTS = 2
BATCHES = (1, 8, 64)
GPU_BATCHES = (1024,)  # end to end on the GPU path only: the large-batch throughput goal
STAGES = {  # id -> label, in report order
    "text_encoder": "text encoder",
    "predictor_step": "predictor step",
    "loop": f"{STEPS}-step loop",
    "inverse_sequential": "inverse (sequential)",
    "inverse_jacobi": "inverse (Jacobi)",
    "inverse_gs_jacobi": f"inverse (GS-Jacobi, {GS_SEGMENTS} segments)",
    "denoiser": "denoiser",
    "audit": "audit (exact NLL)",
}
END_TO_END = {
    "e2e_denoiser": f"end to end: {STEPS} steps + denoiser",
    "e2e_jacobi": f"end to end: {STEPS} steps + Jacobi inverse",
}
GRAPH_STAGES = ("predictor_step", "loop", "inverse_jacobi", "denoiser", "e2e_denoiser", "e2e_jacobi")
# the machine's peak per device and dtype: a square matmul, on each library that runs there; the report
# takes the best round of the fastest library (onnxruntime's MLAS beats torch's MKL on AMD CPUs)
PROBES = {  # name -> (peak it measures, device, dtype, library)
    "cpu-fp32-torch": ("cpu-fp32", "cpu", torch.float32, "torch"),
    "cpu-fp32-onnxruntime": ("cpu-fp32", "cpu", torch.float32, "onnxruntime"),
    "cuda-fp32-torch": ("cuda-fp32", "cuda", torch.float32, "torch"),
    "cuda-bf16-torch": ("cuda-bf16", "cuda", torch.bfloat16, "torch"),
}
PROBE_SIZE = {("cpu", False): 512, ("cpu", True): 512, ("cuda", False): 8192, ("cuda", True): 4096}  # (device, quick)
# rounds: QUICK_ROUNDS in --quick mode, else as many as fit TARGET_SECONDS, within [MIN_ROUNDS, MAX_ROUNDS]
QUICK_ROUNDS, MIN_ROUNDS, MAX_ROUNDS, TARGET_SECONDS = 3, 5, 100, 2.0
NO_CUDA = "needs CUDA (torch.cuda.is_available() is False here): the GPU path is untested on this machine"


@dataclass(frozen=True)
class Backend:
    name: str
    kind: str  # "torch" (eager) | "graph" (ntm_edge.gpu) | "ort" (the runtime)
    device: str  # "cpu" | "cuda"
    precision: str  # "fp32" | "bf16" | the bundle's precision names
    provider: str | None = None  # onnxruntime: "cpu" | "cuda" | "tensorrt"

    @property
    def peak(self) -> str:
        """The matmul probe whose GFLOP/s is this backend's peak: CPU fp32, or CUDA fp32 / 16-bit."""
        if self.device == "cpu":
            return "cpu-fp32"
        return "cuda-fp32" if self.precision == "fp32" else "cuda-bf16"

    def skip_reason(self) -> str | None:
        if self.device == "cuda" and self.kind != "ort" and not torch.cuda.is_available():
            return NO_CUDA
        if self.kind == "ort" and self.provider is not None and self.provider not in available_providers():
            return f"this onnxruntime has no {PROVIDERS[self.provider]}" + (
                " (TensorRT is not installed)" if self.provider == "tensorrt" else "")
        return None


def backends(manifest: dict) -> list[Backend]:
    """Every backend the suite lists for a bundle: torch ones, and onnxruntime per provider and precision."""
    held = {p for graph in manifest["graphs"].values() for p in graph.get("variants", {})}
    out = [Backend("torch", "torch", "cpu", "fp32"), Backend("torch-cuda-eager", "torch", "cuda", "fp32"),
           Backend("torch-cuda-fp32", "graph", "cuda", "fp32"), Backend("torch-cuda-bf16", "graph", "cuda", "bf16")]
    for provider in ("cpu", "cuda", "tensorrt"):
        for p in sorted(held, key=lambda p: PRECISIONS.index(p) if p in PRECISIONS else len(PRECISIONS)):
            out.append(Backend(f"ort-{provider}-{p}", "ort", "cpu" if provider == "cpu" else "cuda", p, provider))
    return out


@dataclass
class Prepared:
    """A zero-argument callable that runs the stage once on a batch (synchronised), its FLOPs per image
    (None where they cannot be counted) and what else the report shows."""

    fn: Callable[[], object]
    flops_per_image: int | None
    info: dict = field(default_factory=dict)


@dataclass
class Inputs:
    prompts: list[str]
    ids: torch.Tensor  # (B, P) int64
    mask: torch.Tensor  # (B, P) bool
    u_top: np.ndarray  # (B, C, H, W) u_T ~ N(0, I): the predictor step's input at t = 1
    u0: np.ndarray  # (B, C, H, W) u_t0 of the sampler, seed 0: the inversions' and the denoiser's input
    x_traj: np.ndarray  # (B, T + 1, C, H, W) forward trajectory of random images: the audit's input
    ts: np.ndarray  # (T + 1,) the sampler's grid


_KEEP_ALIVE: list = []  # a temporary directory prepared for the session lives as long as it


@functools.cache
def session_setup() -> tuple[BenchSetup, dict]:
    """The setup of this pytest session and its bundle's manifest (prepared once, at collection)."""
    setup, tmp = setup_from_env()
    _KEEP_ALIVE.append(tmp)
    return setup, load_bundle(setup.bundle, verify=False).manifest


class Harness:
    def __init__(self, setup: BenchSetup):
        torch.set_num_threads(setup.threads)
        self.setup = setup
        self.model = NTM.from_pretrained(setup.checkpoint).eval()
        self.den = load_denoiser(setup.checkpoint) if has_denoiser(setup.checkpoint) else None
        self.cfg = self.model.config
        self.ts = schedule.time_grid(STEPS, self.cfg.t_min_sample, self.cfg.shift)
        self._runtimes: dict = {}
        self._cuda: dict = {}

    # -- shared inputs ---------------------------------------------------------------------------

    @functools.cache  # noqa: B019  (one harness per session)
    def inputs(self, batch: int) -> Inputs:
        names = self.cfg.prompt.class_names or ("",)
        prompts = [names[i % len(names)] for i in range(batch)]
        ids, mask = self.model.tokenize(prompts)
        rng = np.random.default_rng(batch)
        shape = (batch, self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        u0, _ = self.model.sample_u(ids, mask, STEPS, np.random.default_rng(0), 0.0, float(self.ts[0]))
        x0 = rng.uniform(-1, 1, shape)
        x_traj = schedule.forward_trajectory(x0, self.ts, rng).astype(np.float32)
        return Inputs(prompts, ids, mask, rng.standard_normal(shape, dtype=np.float32), u0.numpy(), x_traj, self.ts)

    def on(self, device: str):
        """(model, denoiser) on ``device`` (copies for CUDA)."""
        if device == "cpu":
            return self.model, self.den
        if device not in self._cuda:
            self._cuda[device] = (copy.deepcopy(self.model).to(device),
                                  None if self.den is None else copy.deepcopy(self.den).to(device))
        return self._cuda[device]

    def runtime(self, b: Backend):
        key = (b.provider, b.precision)
        if key not in self._runtimes:
            self._runtimes[key] = open_runtime(self.setup.bundle, b.provider, self.setup.threads, b.precision)
        return self._runtimes[key]

    # -- stages ----------------------------------------------------------------------------------

    def prepare(self, b: Backend, stage: str, batch: int) -> Prepared:
        """The stage on this backend at this batch; skips (pytest.skip) where it does not exist."""
        reason = b.skip_reason()
        if reason:
            pytest.skip(reason)
        if b.kind == "graph" and stage not in GRAPH_STAGES:
            pytest.skip("not on the GPU path (it captures the sampler loop, the Jacobi inversion and the denoiser)")
        if stage in ("denoiser", "e2e_denoiser") and self.den is None:
            pytest.skip("the checkpoint has no denoiser (ntm-edge train-denoiser)")
        prepare = {"torch": self._torch, "graph": self._graph, "ort": self._ort}[b.kind]
        return prepare(b, stage, batch)

    def _jacobi_flops(self, passes) -> int:
        return flops.inverse_jacobi(self.cfg, flops.jacobi_work(self.cfg, passes))

    def _torch(self, b: Backend, stage: str, batch: int) -> Prepared:
        m, den = self.on(b.device)
        inp = self.inputs(batch)
        ids, mask = inp.ids.to(b.device), inp.mask.to(b.device)
        u_top, u0 = torch.from_numpy(inp.u_top).to(b.device), torch.from_numpy(inp.u0).to(b.device)
        t0, tr, cfg = float(self.ts[0]), m.transporter, self.cfg

        def run(f):
            def fn():
                with torch.no_grad():
                    out = f()
                if b.device != "cpu":
                    torch.cuda.synchronize()
                return out
            return fn

        def report(**kw):
            with torch.no_grad():
                return tr.inverse_with_report(u0, t0, STEPS, "jacobi", **kw)[1]

        if stage == "text_encoder":  # a text model's encoder itself (its forward would answer from its cache)
            enc = m.prompt_encoder.embed if cfg.prompt.kind != "label" else m.prompt_encoder
            return Prepared(run(lambda: enc(ids)), flops.text_encoder(cfg))
        if stage == "predictor_step":
            return Prepared(run(lambda: m.predict(u_top, self.ts[-1], self.ts[-2], STEPS, ids, mask)),
                            flops.predictor_step(cfg))
        if stage == "loop":
            return Prepared(run(lambda: m.sample_levels(ids, mask, STEPS, np.random.default_rng(0), 0.0, t0)),
                            flops.sampler_loop(cfg, STEPS))
        if stage == "inverse_sequential":
            return Prepared(run(lambda: tr.inverse(u0, t0, STEPS)), flops.inverse_sequential(cfg))
        if stage == "inverse_jacobi":
            passes = report().block_iterations
            return Prepared(run(lambda: tr.inverse(u0, t0, STEPS, "jacobi")), self._jacobi_flops(passes),
                            {"passes": list(passes)})
        if stage == "inverse_gs_jacobi":
            its = report(segments=GS_SEGMENTS).iterations
            bounds = segment_bounds(tr.num_tokens, GS_SEGMENTS)
            work = [[(end, n) for (_, end), n in zip(bounds, block, strict=True)] for block in its]
            return Prepared(run(lambda: tr.inverse(u0, t0, STEPS, "jacobi", segments=GS_SEGMENTS)),
                            flops.inverse_jacobi(cfg, work), {"passes": [list(block) for block in its]})
        if stage == "denoiser":
            return Prepared(run(lambda: den(u0, ids, mask)), flops.denoiser(den.config))
        if stage == "audit":
            traj = Trajectory(torch.from_numpy(inp.x_traj).to(b.device),
                              torch.from_numpy(self.ts).float().to(b.device).expand(batch, -1))
            return Prepared(run(lambda: m.trajectory_nll(traj, ids)), flops.audit(cfg, STEPS))
        if stage == "e2e_denoiser":
            return Prepared(run(lambda: sample_images(m, inp.prompts, STEPS, seed=0, final="denoiser", denoiser=den)),
                            flops.sampler_loop(cfg, STEPS) + flops.denoiser(den.config))
        if stage == "e2e_jacobi":
            passes = report().block_iterations  # u0 is this sampler's u_t0 (same seed, prompts and t0)
            return Prepared(run(lambda: sample_images(m, inp.prompts, STEPS, seed=0, final="inverse",
                                                      inverse_method="jacobi")),
                            flops.sampler_loop(cfg, STEPS) + self._jacobi_flops(passes), {"passes": list(passes)})
        raise KeyError(stage)

    def _ort(self, b: Backend, stage: str, batch: int) -> Prepared:
        rt = self.runtime(b)
        inp = self.inputs(batch)
        cfg, t0 = self.cfg, float(self.ts[0])
        den_flops = flops.denoiser(self.den.config) if self.den is not None else None
        needs = {"text_encoder": [PROMPT_ENCODER], "predictor_step": [PROMPT_ENCODER, PREDICTOR_STEP],
                 "loop": [PROMPT_ENCODER, PREDICTOR_STEP], "audit": [PROMPT_ENCODER, PREDICTOR_STEP, TRANSPORTER_FORWARD],
                 "denoiser": [DENOISER], "e2e_denoiser": [PROMPT_ENCODER, PREDICTOR_STEP, DENOISER],
                 "e2e_jacobi": [PROMPT_ENCODER, PREDICTOR_STEP]}.get(stage, [])
        for graph in needs:
            if not rt.has(graph):
                pytest.skip(f"the bundle has no {b.precision} {graph} graph")
        ids, mask = rt.bundle.vocab.tokenize(inp.prompts)
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        if stage == "text_encoder":
            return Prepared(lambda: encode(rt, ids), flops.text_encoder(cfg))
        if stage in ("predictor_step", "loop"):
            null_ids, null_mask = rt.bundle.vocab.null(len(ids))
            emb, null = encode(rt, ids), encode(rt, null_ids)
        if stage == "predictor_step":
            return Prepared(lambda: predict(rt, inp.u_top, self.ts[-1], self.ts[-2], STEPS, emb, null, mask, 0.0, null_mask),
                            flops.predictor_step(cfg))
        if stage == "loop":
            return Prepared(lambda: sample_levels(rt, emb, null, mask, draw_noise(np.random.default_rng(0), batch, shape, STEPS),
                                                  self.ts, 0.0, StageTimer(), null_mask), flops.sampler_loop(cfg, STEPS))
        if stage == "inverse_sequential":
            return Prepared(lambda: invert(rt, inp.u0, t0, STEPS, "sequential"), flops.inverse_sequential(cfg))
        if stage == "inverse_jacobi":
            passes = invert(rt, inp.u0, t0, STEPS, "jacobi")[1].block_iterations
            return Prepared(lambda: invert(rt, inp.u0, t0, STEPS, "jacobi"), self._jacobi_flops(passes),
                            {"passes": list(passes)})
        if stage == "inverse_gs_jacobi":
            its = invert(rt, inp.u0, t0, STEPS, "jacobi", segments=GS_SEGMENTS)[1].iterations
            bounds = segment_bounds(rt.bundle.transporter["num_tokens"], GS_SEGMENTS)
            work = [[(end, n) for (_, end), n in zip(bounds, block, strict=True)] for block in its]
            return Prepared(lambda: invert(rt, inp.u0, t0, STEPS, "jacobi", segments=GS_SEGMENTS),
                            flops.inverse_jacobi(cfg, work), {"passes": [list(block) for block in its]})
        if stage == "denoiser":
            den_emb = encode(rt, ids) if "prompt_emb" in rt.bundle.graphs[DENOISER].input_names else None  # text: its input
            return Prepared(lambda: denoise(rt, inp.u0, ids, den_emb, mask), den_flops)
        if stage == "audit":
            return Prepared(lambda: trajectory_nll(rt, inp.x_traj, self.ts, ids, mask), flops.audit(cfg, STEPS))
        if stage == "e2e_denoiser":
            return Prepared(lambda: generate(rt, inp.prompts, STEPS, seed=0, final="denoiser"),
                            flops.sampler_loop(cfg, STEPS) + (den_flops or 0))
        if stage == "e2e_jacobi":
            report = generate(rt, inp.prompts, STEPS, seed=0, final="inverse", inverse_method="jacobi").report
            passes = report.block_iterations if report is not None else ()
            return Prepared(lambda: generate(rt, inp.prompts, STEPS, seed=0, final="inverse", inverse_method="jacobi"),
                            flops.sampler_loop(cfg, STEPS) + self._jacobi_flops(passes), {"passes": list(passes)})
        raise KeyError(stage)

    def _graph(self, b: Backend, stage: str, batch: int) -> Prepared:
        from ntm_edge.gpu import DTYPES, GraphSampler, StaticGraph, autocast, with_fp32_islands

        m, den = self.on("cuda")
        dtype, dev = DTYPES[b.precision], m.device
        inp = self.inputs(batch)
        cfg = self.cfg

        def synced(f):
            def fn():
                out = f()
                torch.cuda.synchronize()
                return out
            return fn

        if stage == "predictor_step":
            step_model = with_fp32_islands(copy.deepcopy(m))
            t, s = self.ts[-1], self.ts[-2]

            def step(u, ids, mask):
                with autocast(dev, dtype):
                    return step_model.predict(u, t, s, STEPS, ids, mask)

            graph = StaticGraph(step, (torch.from_numpy(inp.u_top).to(dev), inp.ids.to(dev), inp.mask.to(dev)))
            return Prepared(synced(graph.replay), flops.predictor_step(cfg), {"cuda_graph": graph.captured})
        final = "denoiser" if stage in ("denoiser", "e2e_denoiser") or (stage == "loop" and den is not None) else "inverse"
        sampler = GraphSampler(m, batch, STEPS, 0.0, final, den, dtype)
        sampler.sample(inp.prompts, seed=0)  # the real batch: the captured Jacobi passes grow to what it needs
        info = {"cuda_graph": sampler.loop.captured, **({"passes": list(sampler.passes)} if sampler.passes else {})}
        loop_flops = flops.sampler_loop(cfg, STEPS)
        exit_flops = flops.denoiser(den.config) if final == "denoiser" else self._jacobi_flops(sampler.passes)
        if stage == "loop":
            return Prepared(synced(sampler.loop.replay), loop_flops, info)
        if stage in ("inverse_jacobi", "denoiser"):
            return Prepared(synced(sampler.exit.replay), exit_flops, info)
        return Prepared(lambda: sampler.sample(inp.prompts, seed=0), loop_flops + exit_flops, info)  # end to end

    # -- the machine's peak ----------------------------------------------------------------------

    def probe(self, name: str) -> tuple[Callable[[], object], int, dict]:
        """A square matmul on the device, dtype and library of probe ``name`` -> (fn, FLOPs per call, info).
        On CPU the size keeps the operands in cache: it measures arithmetic, not memory."""
        peak, device, dtype, library = PROBES[name]
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip(NO_CUDA)
        n = PROBE_SIZE[(device, self.setup.quick)]
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
        info = {"peak": peak, "library": library, "n": n, "dtype": str(dtype).removeprefix("torch.")}
        if library == "onnxruntime":
            return _ort_matmul(a.numpy(), b.numpy(), self.setup.threads), 2 * n**3, info
        c = torch.empty(n, n, device=device, dtype=dtype)

        def fn():
            torch.mm(a, b, out=c)
            if device == "cuda":
                torch.cuda.synchronize()

        return fn, 2 * n**3, info


def _ort_matmul(a: np.ndarray, b: np.ndarray, threads: int) -> Callable[[], object]:
    """One MatMul node on onnxruntime's CPU provider."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(a.shape)) for name in ("a", "b", "c")]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", io[:2], io[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"a": a, "b": b})


def rounds_for(first_call_seconds: float, quick: bool) -> int:
    if quick:
        return QUICK_ROUNDS
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(TARGET_SECONDS / max(first_call_seconds, 1e-6)))))
