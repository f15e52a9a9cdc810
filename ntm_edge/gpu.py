"""The torch sampler on a CUDA GPU: the four-step loop, the Jacobi inversion and the denoiser, each
captured as a CUDA graph at static shapes after warm-up, under bf16 or fp16 autocast with the fp32
islands kept in fp32. `ntm-edge sample --device cuda` runs it; the bench times it where CUDA exists.

UNTESTED ON A GPU: no machine this project has run on so far has CUDA. The code is written and
statically checked; on CPU the same code runs eagerly (there is no graph to capture), and the tests
check there what does not need CUDA: Algorithm 2 as written here equals ``exits.sample_images``,
autocast (CPU, bfloat16) keeps the islands in fp32, and the samples stay close to fp32 eager ones.
tests/test_gpu.py has the CUDA tests; they skip on machines without CUDA.

- Static shapes: one sampler is built for one batch size, step count, guidance weight and exit.
  Prompts beyond the batch run in chunks of it; a short last chunk is padded (its extra rows dropped).
  The noise comes from ``np.random.default_rng(seed)`` in the order of ``exits.sample_images`` (per
  chunk of ``NOISE_CHUNK`` prompts: u_T, then one z per step), so a seed draws the same images.
- Capture: a graph cannot synchronise with the host, so every time value enters as a device tensor
  (a Python float would be copied from host memory during capture) and the Jacobi inversion runs a
  fixed number of passes per block, found on a warm-up batch. The captured inversion returns each
  block's last relative change; where it is above tol (a batch that needs more passes than the
  warm-up one) that batch is inverted again eagerly with the adaptive stop, so the result is what
  ``Transporter.inverse(method="jacobi")`` gives, whatever the batch.
- fp32 islands (docs/design.md 6): norms (their inputs are upcast by a pre-hook, so they run in fp32 under
  CPU and CUDA autocast alike), the exp of log-scales (the model returns log-scales and affine
  parameters in fp32: ``layers.at_least_fp32``), and softmax inside scaled_dot_product_attention,
  whose kernels accumulate in fp32. The sampler state u stays fp32 from step to step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TypeVar, cast

import numpy as np
import torch
from torch import nn

from .decoding import DEFAULT_TOL
from .errors import ConfigError
from .model import NTM
from .numerics import patchify, to_uint8, unpatchify
from .sampling import NOISE_BATCH, draw_noise
from .transporter import TarFlowBlock

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ISLAND_MODULES = (nn.LayerNorm, nn.GroupNorm)  # norms run in fp32 (an fp32 island)
# Jacobi stops at this relative change per autocast dtype: one pass's rounding noise must stay below it
# (fp16 ~1e-3, transporter.DEFAULT_TOL's note; bf16 has 3 fewer mantissa bits).
JACOBI_TOL = {torch.float32: DEFAULT_TOL, torch.float16: 1e-3, torch.bfloat16: 1e-2}
M = TypeVar("M", bound=nn.Module)
NOISE_CHUNK = NOISE_BATCH  # prompts per noise draw, as exits.sample_images
GRAPH_EXITS = ("denoiser", "inverse")


def require_cuda(device: str) -> torch.device:
    """``device`` as a torch.device, or one clear ConfigError where it names no usable CUDA device."""
    if not str(device).startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}; choose cpu or cuda (cuda:N for the N-th GPU)")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    dev = torch.device(device)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)")
    return dev


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` (off for fp32). The weight-cast cache is off: a captured graph must not
    keep casts made outside it (PyTorch's CUDA graph notes)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False)


def _upcast_input(module, args):
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def with_fp32_islands(module: M) -> M:
    """Make every norm of ``module`` run in fp32 under autocast (its input upcast by a pre-hook; the
    norm's weights are fp32 already). Returns ``module``; meant for the sampler's own copy."""
    for m in module.modules():
        if isinstance(m, ISLAND_MODULES):
            m.register_forward_pre_hook(_upcast_input)
    return module


class StaticGraph:
    """``fn(*inputs)`` at static shapes: captured as one CUDA graph after ``warmup`` eager calls on a
    side stream, then replayed. ``inputs`` are the graph's own tensors: ``graph(*values)`` copies values
    into them and replays; ``replay()`` runs on whatever they hold (another graph's outputs, say).
    ``outputs`` are tensors too, overwritten by every replay.

    On CPU there is nothing to capture: ``captured`` is False and each replay runs ``fn`` eagerly,
    writing its results into the same ``outputs`` tensors, so callers see one behaviour."""

    def __init__(self, fn: Callable, inputs: Sequence[torch.Tensor], warmup: int = 2):
        self.fn, self.inputs = fn, tuple(inputs)
        self.captured = self.inputs[0].is_cuda
        with torch.no_grad():
            if not self.captured:
                self.outputs = _as_tuple(fn(*self.inputs))
                return
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: lazy init, cuBLAS/cuDNN workspaces, autotuning
                for _ in range(warmup):
                    fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = _as_tuple(fn(*self.inputs))

    def replay(self) -> tuple[torch.Tensor, ...]:
        if self.captured:
            self.graph.replay()
        else:
            with torch.no_grad():
                for out, new in zip(self.outputs, _as_tuple(self.fn(*self.inputs)), strict=True):
                    out.copy_(new)
        return self.outputs

    def __call__(self, *values) -> tuple[torch.Tensor, ...]:
        for buf, v in zip(self.inputs, values, strict=True):
            buf.copy_(torch.as_tensor(v))
        return self.replay()


def _as_tuple(x) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def relative_change(new: torch.Tensor, old: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``transporter.relative_change`` as a device tensor (no host sync): max|new - old| / max|new| per
    example, worst example of the batch -> () fp32."""
    new, old = new.float().flatten(1), old.float().flatten(1)
    return ((new - old).abs().amax(1) / (new.abs().amax(1) + eps)).max()


def jacobi_fixed(model: NTM, u: torch.Tensor, t: torch.Tensor, steps: torch.Tensor, passes: Sequence[int]):
    """x = f_T^-1(u) by exactly ``passes[i]`` Jacobi passes on block i (``TarFlowBlock.jacobi_step``,
    one segment; no data-dependent stop, so it can be captured).

    u (B, C, H, W); t, steps (B,) device tensors -> x (B, C, H, W), last relative change per block (L,).
    """
    tr = model.transporter
    c, gate = tr.conditioning(u, t, steps)  # (B, W), (B, 1, 1)
    p = tr.cfg.patch_size
    h = patchify(u, p)  # (B, N, D)
    changes = [u.new_zeros((), dtype=torch.float32)] * len(tr.blocks)
    for i in reversed(range(len(tr.blocks))):  # f_T = blocks[-1] o ... o blocks[0]
        block = cast(TarFlowBlock, tr.blocks[i])
        us = block.scan_order(h)
        xs = us  # exact for token 0, and for every token if the block is the identity
        for _ in range(passes[i]):
            new = block.jacobi_step(xs, us, c, gate)
            changes[i] = relative_change(new, xs)
            xs = new
        h = block.scan_order(xs)
    return unpatchify(h, p, *u.shape[1:]), torch.stack(changes)


class GraphSampler:
    """Algorithm 2 and one exit (``denoiser``, or ``inverse`` by Jacobi passes) for a fixed batch,
    as CUDA graphs on a CUDA model, eagerly on a CPU one. ``dtype``: the autocast dtype
    (torch.bfloat16, torch.float16, or torch.float32 for no autocast). ``tol``: Jacobi's stop
    (default ``JACOBI_TOL[dtype]``); ``passes``: Jacobi passes per block to capture first (default:
    what a warm-up batch needs); they grow when a batch needs more.

    Graphs: ``loop`` (noise (T + 1, B, C, H, W), ids, mask -> u_t0) and ``exit`` (reads the loop's
    output -> x0, and for ``inverse`` the last relative change per block); ``sample`` replays both."""

    def __init__(self, model: NTM, batch: int, steps: int = 4, guidance: float = 0.0, final: str = "denoiser",
                 denoiser=None, dtype: torch.dtype = torch.bfloat16, tol: float | None = None,
                 passes: Sequence[int] | None = None):
        if final not in GRAPH_EXITS:
            raise ConfigError(f"the graph sampler leaves u-space by {' or '.join(GRAPH_EXITS)}, not {final!r}")
        if final == "denoiser" and denoiser is None:
            raise ConfigError("this checkpoint has no denoiser; train one with `ntm-edge train-denoiser` or pick another --final")
        if model.config.objective == "fm":
            raise ConfigError("a flow-matching model has no u-space: it samples with Euler (exits.sample_images)")
        if model.contextual:
            raise ConfigError("a contextual transporter inverts f_T at every step, which the graph sampler does not "
                              "capture: it samples eagerly (exits.sample_images)")
        self.device, self.dtype, self.batch, self.steps = model.device, dtype, batch, steps
        self.guidance, self.final = float(guidance), final
        self.tol = JACOBI_TOL[dtype] if tol is None else tol
        self.model = with_fp32_islands(copy.deepcopy(model)).eval().requires_grad_(False)
        self.denoiser = None if denoiser is None else with_fp32_islands(copy.deepcopy(denoiser)).eval().requires_grad_(False)
        from . import schedule

        cfg = model.config
        t_min = denoiser.config.t0 if final == "denoiser" else cfg.t_min_sample
        self.ts = schedule.time_grid(steps, t_min, cfg.shift)  # (T + 1,) float64
        self.t0 = float(self.ts[0])
        self.shape = (cfg.channels, cfg.image_size, cfg.image_size)
        names = cfg.prompt.class_names or ("",)
        ids, mask = self.model.tokenize([names[i % len(names)] for i in range(batch)])  # (B, P)
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn((steps + 1, batch, *self.shape), generator=gen).to(self.device)
        self.t0_batch = torch.full((batch,), self.t0, device=self.device)  # time values as device tensors
        self.steps_batch = torch.full((batch,), float(steps), device=self.device)
        self.passes: tuple[int, ...] = tuple(passes or ()) if final == "inverse" else ()
        if final == "inverse" and not self.passes:  # passes per block for the captured inversion, from a warm-up batch
            with torch.no_grad(), autocast(self.device, dtype):
                u = self._loop(noise, ids, mask)
                _, report = self.model.transporter.inverse_with_report(u, self.t0_batch, self.steps_batch, "jacobi",
                                                                       tol=self.tol)
            self.passes = report.block_iterations
        self.loop = StaticGraph(self._loop_autocast, (noise, ids, mask))
        self.exit = self._capture_exit()
        self.fallbacks = 0  # batches the captured inversion did not converge on (inverted again eagerly)

    def _capture_exit(self) -> StaticGraph:
        """The exit graph, reading the loop graph's output and prompt tensors."""
        return StaticGraph(self._exit_autocast, (self.loop.outputs[0], self.loop.inputs[1], self.loop.inputs[2]))

    # -- the captured functions ------------------------------------------------------------------

    def _loop(self, noise, ids, mask) -> torch.Tensor:
        """Algorithm 2, steps 1-2: noise (T + 1, B, C, H, W) = [u_T, z for step T, ..., z for step 1] -> u_t0."""
        u = noise[0]  # 1. u_T ~ N(0, I)
        for j, k in enumerate(range(self.steps, 0, -1)):  # 2. u_{k-1} = mu + sigma z
            mu, log_sigma = self.model.predict(u, self.ts[k], self.ts[k - 1], self.steps, ids, mask, self.guidance)
            u = mu + torch.exp(log_sigma) * noise[j + 1]  # fp32 island: mu, log_sigma are fp32
        return u

    def _loop_autocast(self, noise, ids, mask):
        with autocast(self.device, self.dtype):
            return self._loop(noise, ids, mask).float()

    def _exit_autocast(self, u, ids, mask):
        with autocast(self.device, self.dtype):
            if self.final == "denoiser":
                return self.denoiser(u, ids, mask).float()
            x, changes = jacobi_fixed(self.model, u, self.t0_batch, self.steps_batch, self.passes)
            return x.float() / (1.0 - self.t0), changes

    # -- sampling --------------------------------------------------------------------------------

    def run_batch(self, noise: np.ndarray, prompts: Sequence[str]) -> torch.Tensor:
        """noise (T + 1, n, C, H, W) float32 and n <= batch prompts -> x0 (n, C, H, W) on the device."""
        n = len(prompts)
        if n < self.batch:  # pad to the static batch; the extra rows are dropped
            noise = np.concatenate([noise, np.zeros((noise.shape[0], self.batch - n, *noise.shape[2:]), np.float32)], 1)
            prompts = list(prompts) + [prompts[0]] * (self.batch - n)
        ids, mask = self.model.tokenize(prompts)
        self.loop(torch.from_numpy(noise), ids, mask)
        out = self.exit.replay()
        bound = self.model.transporter.num_tokens - 1  # a block is exact after this many passes, whatever its change
        if self.final == "inverse" and any(c > self.tol and p < bound for c, p in zip(out[1].tolist(), self.passes, strict=True)):
            # this batch needs more passes than the captured ones: invert it with the adaptive stop, and
            # capture the exit again with the passes it needed (the graph only ever grows)
            self.fallbacks += 1
            with torch.no_grad(), autocast(self.device, self.dtype):
                x, report = self.model.transporter.inverse_with_report(self.loop.outputs[0], self.t0_batch,
                                                                       self.steps_batch, "jacobi", tol=self.tol)
            self.passes = tuple(map(max, self.passes, report.block_iterations))
            self.exit = self._capture_exit()
            return x.float()[:n] / (1.0 - self.t0)
        return out[0][:n]

    def sample(self, prompts: Sequence[str], seed: int = 0, temperature: float = 1.0) -> np.ndarray:
        """One image per prompt -> uint8 (N, H, W, C), the noise of ``exits.sample_images`` for ``seed``
        (``sampling.draw_noise``, scaled by ``temperature``)."""
        for p in set(prompts):
            self.model.vocab.check(p)  # an unknown prompt fails before any work
        rng = np.random.default_rng(seed)
        out = []
        for c in range(0, len(prompts), NOISE_CHUNK):
            chunk = list(prompts[c : c + NOISE_CHUNK])
            noise = np.stack(draw_noise(rng, len(chunk), self.shape, self.steps, temperature))  # (T + 1, n, C, H, W)
            for b in range(0, len(chunk), self.batch):
                out.append(to_uint8(self.run_batch(noise[:, b : b + self.batch], chunk[b : b + self.batch])))
        return np.concatenate(out)


def sample_images_gpu(model: NTM, prompts, steps: int = 4, seed: int = 0, guidance: float = 0.0, final: str = "inverse",
                      denoiser=None, inverse_method: str = "sequential", dtype: str = "bf16", log=None,
                      temperature: float = 1.0) -> np.ndarray:
    """``exits.sample_images`` on a CUDA model: the graph sampler for the denoiser exit and for the
    Jacobi inverse; every other exit (sequential decoding, score denoising), the flow-matching
    baseline and a contextual transporter's model run eagerly on the device, in fp32."""
    from .exits import sample_images

    if final == "denoiser" or (final == "inverse" and inverse_method == "jacobi"):
        if model.config.objective != "fm" and not model.contextual:
            sampler = GraphSampler(model, min(len(prompts), NOISE_CHUNK), steps, guidance, final, denoiser, DTYPES[dtype])
            images = sampler.sample(prompts, seed, temperature)
            if log:
                log(f"GPU path: CUDA graphs {'on' if sampler.loop.captured else 'off'}, autocast {dtype}"
                    + (f", Jacobi passes per block {list(sampler.passes)}" if sampler.passes else ""))
            return images
    if log:
        what = ("the flow-matching baseline" if model.config.objective == "fm" else
                "a contextual transporter's sampler" if model.contextual else f"exit {final} ({inverse_method})")
        log(f"GPU path: {what} is not captured; it runs eagerly in fp32")
    return sample_images(model, prompts, steps=steps, seed=seed, guidance=guidance, final=final, denoiser=denoiser,
                         inverse_method=inverse_method, temperature=temperature)
