"""The four-step sampler on the runtime (Algorithm 2), numpy + onnxruntime.

Same seed, same images as the torch sampler (``ntm_edge.exits.sample_images``): the loop is
``ntm_edge.sampling.reverse_levels`` with its noise convention (``draw_noise``, per chunk of
``NOISE_BATCH`` prompts), the grid is ``schedule.time_grid(steps, t_min, shift)`` and the guidance
is ``numerics.guided_gaussian`` (paper C.5); only the networks are the bundle's graphs.

    1. u_T ~ N(0, I)
    2. for k = T .. 1: (mu, sigma) = f_P(u_tk, t_k, t_k-1, y), guided;  u_tk-1 = mu + sigma z
    3. leave u-space: x0 = f_T^-1(u_t0) / (1 - t0)  (inverse), or x0 = g_phi(u_t0, y)  (denoiser)

A contextual transporter (f_T of level s reads the step's x_t) leaves u-space at every step instead:
the predictor reads x_tk, and each draw is inverted at once, x_tk-1 = f_T^-1(u_tk-1; t_k-1, T, x_tk)
(``reverse_levels``' ``transport``), so the levels are x and step 3 is x0 = x_t0 / (1 - t0).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ntm_edge import schedule
from ntm_edge.decoding import DEFAULT_METHOD, DEFAULT_TOL, InverseReport
from ntm_edge.errors import ConfigError
from ntm_edge.numerics import guided_gaussian, to_uint8
from ntm_edge.sampling import NOISE_BATCH, draw_noise, reverse_levels

from .bundle import NumericsError
from .inversion import check_settings, contextual, invert
from .prompt_cache import PromptCache
from .session import Runtime
from .specs import DENOISER, PREDICTOR_STEP, PROMPT_ENCODER, SAMPLER_LOOP

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
            self.add(stage, time.perf_counter() - start, calls)

    def add(self, stage: str, seconds: float, calls: int = 1) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.calls[stage] = self.calls.get(stage, 0) + calls


@dataclass
class RunResult:
    images: np.ndarray  # uint8 (N, H, W, C)
    x0: np.ndarray  # float32 (N, C, H, W), before clipping and quantisation
    u_levels: np.ndarray  # float32 (N, T + 1, C, H, W), ordered t_0 .. t_T (x levels for a contextual bundle)
    ts: np.ndarray  # float64 (T + 1,)
    final: str
    timer: StageTimer
    report: InverseReport | None = None  # inverse: passes (or decoding steps) per block and segment, last batch
    nll: np.ndarray | None = None  # exact trajectory NLL in nats (N,), with audit=True


def image_shape(rt: Runtime) -> tuple[int, int, int]:
    cfg = rt.bundle.config
    return cfg.channels, cfg.image_size, cfg.image_size


def encode(rt: Runtime, ids: np.ndarray) -> np.ndarray:
    """ids (B, P) -> prompt_emb (B, P, E)."""
    return rt[PROMPT_ENCODER](ids=ids)["prompt_emb"]


def encode_cached(rt: Runtime, ids: np.ndarray, timer: StageTimer) -> np.ndarray:
    """ids (B, P) -> prompt_emb (B, P, E), timed as the "text encoder" stage. A text bundle looks every
    prompt up in the on-disk ``PromptCache`` (keyed by the encoder's weights hash and the ids) first and
    runs the encoder graph on the misses only; when every prompt hits, the stage is "text encoder
    (cache hit)"."""
    encoder_sha256 = rt.bundle.manifest["prompts"].get("encoder_sha256")
    if encoder_sha256 is None:  # a label table: one lookup, nothing to cache
        with timer("text encoder"):
            return encode(rt, ids)
    start = time.perf_counter()
    cache = PromptCache(encoder_sha256)
    (B, P), E = ids.shape, rt.bundle.config.prompt.dim
    emb = np.zeros((B, P, E), dtype=np.float32)
    missing = []
    for i, row in enumerate(ids):
        hit = cache.get(row, (P, E))
        if hit is None:
            missing.append(i)
        else:
            emb[i] = hit
    if missing:
        emb[missing] = encode(rt, ids[missing])  # (M, P, E)
        for i in missing:
            cache.put(ids[i], emb[i])
    timer.add("text encoder" if missing else "text encoder (cache hit)", time.perf_counter() - start)
    return emb


def denoise(rt: Runtime, u0: np.ndarray, ids: np.ndarray, emb: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
    """x0 = g_phi(u_t0, prompt) (B, C, H, W). A label bundle's denoiser graph reads the ids (its own copy
    of the label table), a text bundle's the prompt encoder's output ``emb`` (B, P, E), so that the
    MiniLM runs once per prompt for the predictor and the denoiser both."""
    graph = rt[DENOISER]
    prompt = {"prompt_emb": emb} if "prompt_emb" in graph.spec.input_names else {"ids": ids}
    return graph(u=u0, prompt_mask=mask, **prompt)["x0"]


def predict(rt: Runtime, u_t, t: float, s: float, steps: int, emb, null_emb, mask, guidance: float,
            null_mask=None):
    """The guided Gaussian over u_s: u_t (B, C, H, W) -> mu, log_sigma (B, C, H, W), as ``NTM.predict``:
    guidance 0 is the conditional graph call alone; otherwise one call on the 2B batch (conditional,
    unconditional) and ``guided_gaussian``."""
    B = u_t.shape[0]
    graph = rt[PREDICTOR_STEP]
    null_mask = mask if null_mask is None else null_mask

    def full(v, n):
        return np.full((n,), v, dtype=np.float32)

    if guidance == 0.0:
        out = graph(u_t=u_t, t=full(t, B), s=full(s, B), steps=full(steps, B), prompt_emb=emb, prompt_mask=mask)
        return out["mu"], out["log_sigma"]
    out = graph(u_t=np.concatenate([u_t, u_t]), t=full(t, 2 * B), s=full(s, 2 * B), steps=full(steps, 2 * B),
                prompt_emb=np.concatenate([emb, null_emb]), prompt_mask=np.concatenate([mask, null_mask]))
    mu, ls = out["mu"], out["log_sigma"]  # conditional half, then unconditional
    return guided_gaussian(mu[:B], ls[:B], mu[B:], ls[B:], guidance)


def sample_levels(rt: Runtime, emb, null_emb, mask, noise: list[np.ndarray], ts: np.ndarray, guidance: float,
                  timer: StageTimer, null_mask=None, inversion: dict | None = None) -> np.ndarray:
    """Steps 1-2 of Algorithm 2 with one predictor graph call per step -> u (B, T + 1, C, H, W), t_0 .. t_T.
    A contextual bundle's levels are x instead: every draw inverted given the level above it, with the
    ``inversion`` settings (method, segments, tol, max_iters) of ``invert``."""
    steps = len(ts) - 1

    def timed_predict(u_t, t, s):
        with timer(f"predictor x {steps}"):
            return predict(rt, u_t, t, s, steps, emb, null_emb, mask, guidance, null_mask)

    transport = None
    if contextual(rt):
        settings = dict(inversion or {})
        method = settings.get("method", DEFAULT_METHOD)

        def transport(u_s, x_t, s):
            with timer(f"inverse ({method}) x {steps}"):
                return invert(rt, u_s, s, steps, context=x_t, **settings)[0]

    return reverse_levels(timed_predict, noise, ts, transport)


def sample_levels_unrolled(rt: Runtime, emb, null_emb, mask, noise: list[np.ndarray], ts: np.ndarray,
                           guidance: float, timer: StageTimer, null_mask=None) -> np.ndarray:
    """Steps 1-2 as one call of the unrolled ``sampler_loop`` graph (T fixed at export)."""
    steps = len(ts) - 1
    z = np.stack(noise[1:][::-1], axis=1)  # (B, T, C, H, W): z[:, j] draws level j
    with timer(f"predictor x {steps} (unrolled)"):
        return rt[SAMPLER_LOOP](u_top=noise[0], noise=z, levels_t=ts.astype(np.float32), prompt_emb=emb,
                                null_emb=null_emb, prompt_mask=mask, null_mask=mask if null_mask is None else null_mask,
                                guidance=np.array([guidance], dtype=np.float32))["u_levels"]


def check_options(rt: Runtime, steps: int, guidance: float, final: str, unrolled: bool) -> None:
    if steps < 1:
        raise ConfigError("--steps must be at least 1")
    if not guidance >= 0:
        raise ConfigError("--guidance must be >= 0")
    if final not in FINALS:
        raise ConfigError(f"unknown exit {final!r}; choose one of: {', '.join(FINALS)}")
    if final == "denoiser" and not rt.has(DENOISER):
        raise ConfigError("this bundle has no denoiser (train one with `ntm-edge train-denoiser`, re-export), "
                          "or use --final inverse")
    if unrolled and SAMPLER_LOOP not in rt.bundle.graphs:
        raise ConfigError("this bundle has no unrolled sampler graph (a contextual transporter inverts f_T after "
                          "every step); run without --unrolled")
    if unrolled and steps != rt.bundle.config.steps:
        raise ConfigError(f"the unrolled sampler graph was exported for --steps {rt.bundle.config.steps}, not {steps}")


def default_final(rt: Runtime) -> str:
    """The learned denoiser when the bundle has one (as `ntm-edge sample`), else the exact inverse."""
    return "denoiser" if rt.has(DENOISER) else "inverse"


def generate(rt: Runtime, prompts, steps: int = 4, seed: int = 0, guidance: float = 0.0, final: str | None = None,
             inverse_method: str = DEFAULT_METHOD, segments=1, tol=DEFAULT_TOL, max_iters=None, unrolled: bool = False,
             audit: bool = False, timer: StageTimer | None = None, temperature: float = 1.0) -> RunResult:
    """One image per prompt -> RunResult (images uint8 (N, H, W, C), the u levels, stage timings; with
    ``audit`` the exact NLL of every generated trajectory under the conditional model).
    temperature: every noise draw scaled by it (``sampling.draw_noise``; the graphs take the noise as input).

    inverse_method, segments, tol, max_iters: the transporter inversion, as ``Transporter.inverse``
    (one value, or one per block)."""
    from .audit import generated_nll

    final = final or default_final(rt)
    check_options(rt, steps, guidance, final, unrolled)
    inversion = dict(method=inverse_method, segments=segments, tol=tol, max_iters=max_iters)
    check_settings(rt, **inversion)
    timer = timer or StageTimer()
    vocab, cfg = rt.bundle.vocab, rt.bundle.config
    den = rt.bundle.denoiser  # checked above: present when final is "denoiser"
    t_min = den["t0"] if final == "denoiser" and den else cfg.t_min_sample
    ts = schedule.time_grid(steps, t_min, cfg.shift)  # (T + 1,) float64
    t0 = float(ts[0])
    shape, batch = image_shape(rt), rt.bundle.batch
    rng = np.random.default_rng(seed)
    prompts = list(prompts)
    images, x0s, us, nlls, report = [], [], [], [], None
    start = time.perf_counter()
    for c in range(0, len(prompts), NOISE_BATCH):
        chunk = prompts[c : c + NOISE_BATCH]
        noise = draw_noise(rng, len(chunk), shape, steps, temperature)
        ids_all, mask_all = vocab.tokenize(chunk)  # (n, P)
        for b in range(0, len(chunk), batch):  # engine batches inside one noise chunk
            sl = slice(b, b + batch)
            ids, mask = ids_all[sl], mask_all[sl]
            B = len(ids)
            null_ids, null_mask = vocab.null(B)
            emb_all = encode_cached(rt, np.concatenate([ids, null_ids]), timer)  # conditional, null
            emb, null_emb = emb_all[:B], emb_all[B:]
            levels = [n[sl] for n in noise]
            if unrolled:
                u = sample_levels_unrolled(rt, emb, null_emb, mask, levels, ts, guidance, timer, null_mask)
            else:  # (B, K, C, H, W): u levels, or x levels for a contextual bundle
                u = sample_levels(rt, emb, null_emb, mask, levels, ts, guidance, timer, null_mask, inversion)
            if final == "denoiser":
                with timer("denoiser"):
                    x = denoise(rt, u[:, 0], ids, emb, mask)
            elif contextual(rt):  # the levels are x already: the last step inverted x_t0
                x = schedule.decoder_mean(u[:, 0], t0)
            else:
                with timer(f"inverse ({inverse_method})"):
                    x_t0, report = invert(rt, u[:, 0], t0, steps, **inversion)
                    x = schedule.decoder_mean(x_t0, t0)
            if not np.isfinite(x).all():
                raise NumericsError("the sampler produced NaN or inf values: the bundle's graphs overflow "
                                    f"(prompt {chunk[b]!r}, seed {seed}, guidance {guidance}, temperature {temperature})")
            if audit:
                with timer("audit"):
                    nlls.append(generated_nll(rt, u, ts, ids, mask, **inversion))
            images.append(to_uint8(x))
            x0s.append(x)
            us.append(u)
    timer.seconds["total"] = time.perf_counter() - start
    timer.calls["total"] = 1
    return RunResult(np.concatenate(images), np.concatenate(x0s), np.concatenate(us), ts, final, timer, report,
                     np.concatenate(nlls) if audit else None)
