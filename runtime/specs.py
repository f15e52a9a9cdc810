"""The IO spec of every exported graph, as data (one place that export, calibration, engine
build and the runtime all read). Pure Python: no torch, no onnxruntime.

A ``GraphSpec`` names a graph's inputs and outputs, their dtypes and shapes; a shape entry is an int
(static) or the name of a dynamic axis ("batch"), and ``dims`` gives each dynamic axis its
(min, opt, max) sizes, from which TensorRT-style min/opt/max shapes follow. ``graph_specs`` builds
them for one model; the exporter traces each graph with exactly these names, writes them into
``manifest.json``, and the runtime reads them back from there (it never rebuilds them).

Graphs (docs/design.md 5), all with a dynamic batch axis, float32 unless noted:

    prompt_encoder          ids int64 (B, P)                                   -> prompt_emb (B, P, E)
    predictor_step          u_t (B, C, H, W), t, s, steps (B,), prompt_emb, prompt_mask bool (B, P)
                                                                               -> mu, log_sigma (B, C, H, W)
    sampler_loop            u_top (B, C, H, W), noise (B, T, C, H, W), levels_t (T + 1,), prompt_emb,
                            null_emb (B, P, E), prompt_mask, null_mask, guidance (1,)
                                                                               -> u_levels (B, T + 1, C, H, W)
    transporter_forward     x (B, C, H, W), t, steps (B,) [, context (B, C, H, W)]
                                                                               -> u (B, C, H, W), logdet (B,)
    transporter_jacobi_<i>  x, u (B, C, H, W), t, steps (B,) [, context]       -> x_next (B, C, H, W)
    transporter_step_<i>    x_token (B, D), position int64 (1,), t, steps (B,), k_cache, v_cache
                            (L, B, heads, N, hd) [, context]                   -> mu, alpha (B, D), k_cache_out,
                                                                                  v_cache_out (L, B, heads, N, hd)
    denoiser                u (B, C, H, W), ids int64 (B, P) | prompt_emb (B, P, E), prompt_mask bool
                                                                               -> x0 (B, C, H, W)

P is 1 for a label model (one learned token per class) and ``max_tokens`` for a text model, whose
prompt encoder is the frozen MiniLM (E = 384; the mask is ids != [PAD] inside the graph, padding zeroed;
built torch-free by ``runtime.text_graph``, the same file for every text model). The denoiser of a
label model reads ids (it trains its own copy of the label table); the denoiser of a text model reads
the prompt encoder's output, as the predictor does, so the MiniLM runs once for both.

``steps`` is the coarse step count T as a float (the networks read 1/T). In ``sampler_loop``,
``noise[:, j]`` is the z that draws level j (j = 0 .. T - 1) and ``u_levels`` is ordered t_0 .. t_T.
The transporter graphs of block i (``Transporter.blocks[i]``) work in that block's scan order: the
Jacobi pass takes and returns images, the sequential step takes token n of the scan-ordered patch
sequence and returns the affine parameters of token n + 1 (x_{n+1} = u_{n+1} exp(alpha) + mu).

A contextual transporter (``TransporterConfig.context``: f_T of level s reads the step's x_t) changes
three things: every transporter graph takes the step's x_t as a last input ``context`` (an image, in
natural order, for the sequential step too); the predictor step reads x_t itself (its input keeps the
name ``u_t``); and there is no ``sampler_loop``, because such a sampler inverts f_T after every draw
(the runtime runs that loop over the predictor-step and Jacobi graphs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROMPT_ENCODER = "prompt_encoder"
PREDICTOR_STEP = "predictor_step"
SAMPLER_LOOP = "sampler_loop"
TRANSPORTER_FORWARD = "transporter_forward"
DENOISER = "denoiser"
DTYPES = ("float32", "float16", "int64", "bool")


def jacobi_graph(block: int) -> str:
    return f"transporter_jacobi_{block}"


def step_graph(block: int) -> str:
    return f"transporter_step_{block}"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: a name, a dtype (``DTYPES``) and a shape of ints and dynamic-axis names."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def resolve(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """The concrete shape for sizes of the dynamic axes, e.g. {"batch": 4}."""
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)

    def to_dict(self, dims: dict[str, tuple[int, int, int]]) -> dict:
        profile = {key: list(self.resolve({d: v[i] for d, v in dims.items()})) for i, key in
                   enumerate(("min_shape", "opt_shape", "max_shape"))}
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "dynamic_axes": {str(k): v for k, v in self.dynamic_axes.items()}, **profile}

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        if d["dtype"] not in DTYPES:
            raise ValueError(f"unknown dtype {d['dtype']!r}")
        return cls(str(d["name"]), d["dtype"], tuple(v if isinstance(v, str) else int(v) for v in d["shape"]))


@dataclass(frozen=True)
class GraphSpec:
    """A graph's IO, with (min, opt, max) per dynamic axis; ``doc`` says what the graph computes."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    doc: str = ""

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's ``dynamic_axes`` argument."""
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.dynamic_axes}

    def to_dict(self) -> dict:
        return {"doc": self.doc,
                "dims": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in self.dims.items()},
                "inputs": [t.to_dict(self.dims) for t in self.inputs],
                "outputs": [t.to_dict(self.dims) for t in self.outputs]}

    @classmethod
    def from_dict(cls, name: str, d: dict) -> GraphSpec:
        dims = {k: (int(v["min"]), int(v["opt"]), int(v["max"])) for k, v in d.get("dims", {}).items()}
        return cls(name, tuple(map(TensorSpec.from_dict, d["inputs"])), tuple(map(TensorSpec.from_dict, d["outputs"])),
                   dims, d.get("doc", ""))


def _t(name: str, *shape, dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


def graph_specs(config, batch: int = 8, has_denoiser: bool = False) -> dict[str, GraphSpec]:
    """Every graph of one model (an ``NTMConfig``), in export order.

    ``batch`` is the number of images the runtime sends through a graph at once (opt and max of the
    batch axis); the prompt encoder and the predictor step see twice that under guidance (the
    conditional and unconditional halves in one pass).
    """
    if config.objective == "fm":
        raise ValueError("a flow-matching model has no u-space sampler to export")
    B = "batch"
    C, S = config.channels, config.image_size
    text = config.prompt.kind != "label"
    P, E = (config.prompt.max_tokens if text else 1), config.prompt.dim  # word pieces, or one token per label
    K = config.steps + 1
    img = (B, C, S, S)
    one, two = {B: (1, batch, batch)}, {B: (1, 2 * batch, 2 * batch)}
    contextual = bool(config.transporter.context)
    specs = [
        GraphSpec(PROMPT_ENCODER, (_t("ids", B, P, dtype="int64"),), (_t("prompt_emb", B, P, E),), two,
                  "prompt ids -> prefix embeddings (" + ("the frozen MiniLM; padding zeroed)" if text else
                                                      "the label table; row 0 is the null prompt)")),
        GraphSpec(PREDICTOR_STEP,
                  (_t("u_t", *img), _t("t", B), _t("s", B), _t("steps", B), _t("prompt_emb", B, P, E),
                   _t("prompt_mask", B, P, dtype="bool")),
                  (_t("mu", *img), _t("log_sigma", *img)), two,
                  "f_P: the Gaussian N(mu, exp(log_sigma)^2) over u_s given " +
                  ("x_t (a contextual transporter)" if contextual else "u_t") + " (Prop. 2 parametrisation)"),
    ]
    if not contextual:  # a contextual sampler inverts f_T after every draw: the runtime runs its loop
        specs.append(GraphSpec(SAMPLER_LOOP,
                  (_t("u_top", *img), _t("noise", B, K - 1, C, S, S), _t("levels_t", K), _t("prompt_emb", B, P, E),
                   _t("null_emb", B, P, E), _t("prompt_mask", B, P, dtype="bool"),
                   _t("null_mask", B, P, dtype="bool"), _t("guidance", 1)),
                  (_t("u_levels", B, K, C, S, S),), one,
                  f"Algorithm 2 steps 1-2 unrolled for T = {config.steps}, guided (C.5) with weight `guidance`"))
    tc = config.transporter
    if tc.num_blocks:
        N, D = (S // tc.patch_size) ** 2, C * tc.patch_size**2
        cache = (tc.layers_per_block, B, tc.heads, N, tc.width // tc.heads)
        ctx = (_t("context", *img),) if contextual else ()  # the step's x_t
        given = " given the step's x_t" if contextual else ""
        specs.append(GraphSpec(TRANSPORTER_FORWARD, (_t("x", *img), _t("t", B), _t("steps", B), *ctx),
                               (_t("u", *img), _t("logdet", B)), one, f"f_T(x, t, T){given} and log|det df_T/dx|"))
        for i in range(tc.num_blocks):
            specs.append(GraphSpec(jacobi_graph(i), (_t("x", *img), _t("u", *img), _t("t", B), _t("steps", B), *ctx),
                                   (_t("x_next", *img),), one,
                                   f"one Jacobi pass of block {i}{given}: x <- mu(x_<n) + exp(alpha(x_<n)) u"))
            specs.append(GraphSpec(
                step_graph(i),
                (_t("x_token", B, D), _t("position", 1, dtype="int64"), _t("t", B), _t("steps", B),
                 _t("k_cache", *cache), _t("v_cache", *cache), *ctx),
                (_t("mu", B, D), _t("alpha", B, D), _t("k_cache_out", *cache), _t("v_cache_out", *cache)), one,
                f"one sequential decoding step of block {i}: token n (scan order) and the KV cache of tokens < n "
                f"-> affine parameters of token n + 1 and the cache with token n written{given}"))
    if has_denoiser:  # a label denoiser reads ids (its own copy of the table); a text one the MiniLM's output
        prompt = _t("prompt_emb", B, P, E) if text else _t("ids", B, P, dtype="int64")
        specs.append(GraphSpec(DENOISER, (_t("u", *img), prompt, _t("prompt_mask", B, P, dtype="bool")),
                               (_t("x0", *img),), one, "g_phi: u_t0 and the prompt -> x0 in one pass (paper 3.9)"))
    return {s.name: s for s in specs}
