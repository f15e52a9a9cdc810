"""The four-step sampler on the runtime (Algorithm 2), numpy + onnxruntime.

Same seed, same images as the torch sampler (``ntm_edge.exits.sample_images``): the noise comes from
``np.random.default_rng(seed)`` in the same order (per chunk of ``NOISE_BATCH`` prompts: u_T, then
one z per step, each ``standard_normal(shape, dtype=float32)``), the grid is
``schedule.time_grid(steps, t_min, shift)`` and the guidance is the same formula (paper C.5).

    1. u_T ~ N(0, I)
    2. for k = T .. 1: (mu, sigma) = f_P(u_tk, t_k, t_k-1, y), guided;  u_tk-1 = mu + sigma z
    3. leave u-space: x0 = f_T^-1(u_t0) / (1 - t0)  (inverse), or x0 = g_phi(u_t0, y)  (denoiser)
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .. import schedule
from ..errors import ConfigError
from ..prompts import NULL_ID
from .bundle import NumericsError
from .inversion import DEFAULT_TOL, METHODS, invert
from .session import Runtime
from .specs import DENOISER, PREDICTOR_STEP, PROMPT_ENCODER, SAMPLER_LOOP

NOISE_BATCH = 256  # prompts per noise draw, = the batch_size default of exits.sample_images (a test pins it)
FINALS = ("denoiser", "inverse")


@dataclass
class StageTimer:
    """Wall-clock seconds and calls per stage, accumulated over batches (time.perf_counter)."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str, calls: int = 1):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
            self.calls[stage] = self.calls.get(stage, 0) + calls


@dataclass
class RunResult:
    images: np.ndarray  # uint8 (N, H, W, C)
    x0: np.ndarray  # float32 (N, C, H, W), before clipping and quantisation
    u_levels: np.ndarray  # float32 (N, T + 1, C, H, W), ordered t_0 .. t_T
    ts: np.ndarray  # float64 (T + 1,)
    final: str
    timer: StageTimer
    passes: list[int] = field(default_factory=list)  # inverse: passes (or decoding steps) per block, last batch
    nll: np.ndarray | None = None  # exact trajectory NLL in nats (N,), with audit=True


def guided_gaussian(mu_c, ls_c, mu_u, ls_u, w: float):
    """Classifier-free guidance on a Gaussian (paper C.5; ``ntm_edge.model.guided_gaussian``):
    r = min(sigma_c / sigma_u, 1)^2, sigma = sigma_c / sqrt(1 + w - w r), mu = ((1 + w) mu_c - w r mu_u) / (1 + w - w r)."""
    w = np.float32(w)
    r = np.exp(2.0 * np.minimum(ls_c - ls_u, 0.0))
    denom = 1.0 + w - w * r
    return ((1.0 + w) * mu_c - w * r * mu_u) / denom, ls_c - 0.5 * np.log(denom)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] (B, C, H, W) -> uint8 (B, H, W, C) (``ntm_edge.model.to_uint8``)."""
    x = np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


def image_shape(rt: Runtime) -> tuple[int, int, int]:
    cfg = rt.bundle.config
    return cfg.channels, cfg.image_size, cfg.image_size


def draw_noise(rng: np.random.Generator, n: int, shape: tuple[int, ...], steps: int) -> list[np.ndarray]:
    """[u_T, z for step T, ..., z for step 1], each float32 (n, C, H, W), in the torch sampler's order."""
    return [rng.standard_normal((n, *shape), dtype=np.float32) for _ in range(steps + 1)]


def encode(rt: Runtime, ids: np.ndarray) -> np.ndarray:
    """ids (B, P) -> prompt_emb (B, P, E)."""
    return rt[PROMPT_ENCODER](ids=ids)["prompt_emb"]


def predict(rt: Runtime, u_t, t: float, s: float, steps: int, emb, null_emb, mask, guidance: float):
    """The guided Gaussian over u_s: u_t (B, C, H, W) -> mu, log_sigma (B, C, H, W) (``NTM.predict``)."""
    B = u_t.shape[0]
    graph = rt[PREDICTOR_STEP]

    def full(v, n):
        return np.full((n,), v, dtype=np.float32)

    if guidance == 0.0:
        out = graph(u_t=u_t, t=full(t, B), s=full(s, B), steps=full(steps, B), prompt_emb=emb, prompt_mask=mask)
        return out["mu"], out["log_sigma"]
    out = graph(u_t=np.concatenate([u_t, u_t]), t=full(t, 2 * B), s=full(s, 2 * B), steps=full(steps, 2 * B),
                prompt_emb=np.concatenate([emb, null_emb]), prompt_mask=np.concatenate([mask, mask]))
    mu, ls = out["mu"], out["log_sigma"]  # conditional half, then unconditional
    return guided_gaussian(mu[:B], ls[:B], mu[B:], ls[B:], guidance)


def sample_levels(rt: Runtime, emb, null_emb, mask, noise: list[np.ndarray], ts: np.ndarray, guidance: float,
                  timer: StageTimer) -> np.ndarray:
    """Steps 1-2 of Algorithm 2 with one predictor graph call per step -> u (B, T + 1, C, H, W), t_0 .. t_T."""
    steps = len(ts) - 1
    levels = [noise[0]]  # 1. u_T ~ N(0, I)
    for j, k in enumerate(range(steps, 0, -1)):  # 2. u_{k-1} = mu + sigma z
        with timer(f"predictor x {steps}"):
            mu, log_sigma = predict(rt, levels[-1], ts[k], ts[k - 1], steps, emb, null_emb, mask, guidance)
            levels.append(mu + np.exp(log_sigma) * noise[j + 1])
    return np.stack(levels[::-1], axis=1)


def sample_levels_unrolled(rt: Runtime, emb, null_emb, mask, noise: list[np.ndarray], ts: np.ndarray,
                           guidance: float, timer: StageTimer) -> np.ndarray:
    """Steps 1-2 as one call of the unrolled ``sampler_loop`` graph (T fixed at export)."""
    steps = len(ts) - 1
    z = np.stack(noise[1:][::-1], axis=1)  # (B, T, C, H, W): z[:, j] draws level j
    with timer(f"predictor x {steps} (unrolled)"):
        return rt[SAMPLER_LOOP](u_top=noise[0], noise=z, levels_t=ts.astype(np.float32), prompt_emb=emb,
                                null_emb=null_emb, prompt_mask=mask,
                                guidance=np.array([guidance], dtype=np.float32))["u_levels"]


def check_options(rt: Runtime, steps: int, guidance: float, final: str, inverse_method: str, unrolled: bool) -> None:
    if steps < 1:
        raise ConfigError("--steps must be at least 1")
    if not guidance >= 0:
        raise ConfigError("--guidance must be >= 0")
    if final not in FINALS:
        raise ConfigError(f"unknown exit {final!r}; choose one of: {', '.join(FINALS)}")
    if inverse_method not in METHODS:
        raise ConfigError(f"unknown inversion method {inverse_method!r}; choose one of: {', '.join(METHODS)}")
    if final == "denoiser" and not rt.has(DENOISER):
        raise ConfigError("this bundle has no denoiser (train one with `ntm-edge train-denoiser`, re-export), "
                          "or use --final inverse")
    if unrolled and steps != rt.bundle.config.steps:
        raise ConfigError(f"the unrolled sampler graph was exported for --steps {rt.bundle.config.steps}, not {steps}")


def default_final(rt: Runtime) -> str:
    """The learned denoiser when the bundle has one (as `ntm-edge sample`), else the exact inverse."""
    return "denoiser" if rt.has(DENOISER) else "inverse"


def generate(rt: Runtime, prompts, steps: int = 4, seed: int = 0, guidance: float = 0.0, final: str | None = None,
             inverse_method: str = "jacobi", tol: float = DEFAULT_TOL, unrolled: bool = False,
             audit: bool = False, timer: StageTimer | None = None) -> RunResult:
    """One image per prompt -> RunResult (images uint8 (N, H, W, C), the u levels, stage timings; with
    ``audit`` the exact NLL of every generated trajectory under the conditional model)."""
    from .audit import generated_nll

    final = final or default_final(rt)
    check_options(rt, steps, guidance, final, inverse_method, unrolled)
    timer = timer or StageTimer()
    vocab, cfg = rt.bundle.vocab, rt.bundle.config
    t_min = rt.bundle.denoiser["t0"] if final == "denoiser" else cfg.t_min_sample
    ts = schedule.time_grid(steps, t_min, cfg.shift)  # (T + 1,) float64
    t0 = float(ts[0])
    shape, batch = image_shape(rt), rt.bundle.batch
    rng = np.random.default_rng(seed)
    prompts = list(prompts)
    images, x0s, us, nlls, passes = [], [], [], [], []
    start = time.perf_counter()
    for c in range(0, len(prompts), NOISE_BATCH):
        chunk = prompts[c : c + NOISE_BATCH]
        noise = draw_noise(rng, len(chunk), shape, steps)
        ids_all, mask_all = vocab.tokenize(chunk)  # (n, P)
        for b in range(0, len(chunk), batch):  # engine batches inside one noise chunk
            sl = slice(b, b + batch)
            ids, mask = ids_all[sl], mask_all[sl]
            B = len(ids)
            with timer("text encoder"):
                emb_all = encode(rt, np.concatenate([ids, np.full_like(ids, NULL_ID)]))  # conditional, null
            emb, null_emb = emb_all[:B], emb_all[B:]
            sampler = sample_levels_unrolled if unrolled else sample_levels
            u = sampler(rt, emb, null_emb, mask, [n[sl] for n in noise], ts, guidance, timer)  # (B, K, C, H, W)
            if final == "denoiser":
                with timer("denoiser"):
                    x = rt[DENOISER](u=u[:, 0], ids=ids, prompt_mask=mask)["x0"]
            else:
                with timer(f"inverse ({inverse_method})"):
                    x_t0, passes = invert(rt, u[:, 0], t0, steps, inverse_method, tol)
                    x = x_t0 / np.float32(1.0 - t0)
            if not np.isfinite(x).all():
                raise NumericsError("the sampler produced NaN or inf values: the bundle's graphs overflow "
                                    f"(prompt {chunk[b]!r}, seed {seed}, guidance {guidance})")
            if audit:
                with timer("audit"):
                    nlls.append(generated_nll(rt, u, ts, ids, mask, inverse_method, tol))
            images.append(to_uint8(x))
            x0s.append(x)
            us.append(u)
    timer.seconds["total"] = time.perf_counter() - start
    timer.calls["total"] = 1
    return RunResult(np.concatenate(images), np.concatenate(x0s), np.concatenate(us), ts, final, timer, passes,
                     np.concatenate(nlls) if audit else None)
