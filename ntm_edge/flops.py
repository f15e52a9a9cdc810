"""FLOPs per image of each stage, counted from the model config (no torch: the bench report and the
torch-free side can both read it).

What is counted is what ``torch.utils.flop_counter`` counts: the multiply-adds of matrix products,
convolutions and attention, two FLOPs each (attention as its full Q K^T and A V products, whatever
the mask: causal blocks are counted as dense). Not counted: elementwise work (norms, activations,
exp, the Gaussian arithmetic of a step), embedding lookups and memory traffic (so a label table costs
nothing; the MiniLM of a text model is counted, ``text_encoder``). Every count is per
image and exact for batch B as B times the count (no part of a graph is shared across a batch);
tests/test_flops.py checks each against ``FlopCounterMode`` on the real modules.

Counts that depend on the run (Jacobi passes, GS-Jacobi segments) take what the run used.
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import MiniLMConfig, NTMConfig, PredictorConfig, TransporterConfig

FOURIER_DIM = 64  # = layers.ConditionMLP's feat_dim: features per conditioning scalar


# -- primitives ------------------------------------------------------------------------------------


def linear(n_in: int, n_out: int, rows: int = 1) -> int:
    """nn.Linear on ``rows`` vectors (the bias is not a multiply-add)."""
    return 2 * rows * n_in * n_out


def conv(c_in: int, c_out: int, kernel: int, h_out: int, w_out: int) -> int:
    """nn.Conv2d, counted on its output pixels."""
    return 2 * c_in * c_out * kernel * kernel * h_out * w_out


def attention(queries: int, keys: int, width: int) -> int:
    """Scaled dot-product attention, all heads: Q K^T and A V, each 2 * queries * keys * width."""
    return 4 * queries * keys * width


def transformer_layer(tokens: int, width: int, mlp_ratio: int, keys: int | None = None) -> int:
    """layers.TransformerLayer on ``tokens`` queries attending to ``keys`` keys (default: themselves)."""
    keys = tokens if keys is None else keys
    hidden = mlp_ratio * width
    return (linear(width, 3 * width, tokens) + attention(tokens, keys, width) + linear(width, width, tokens)
            + linear(width, hidden, tokens) + linear(hidden, width, tokens))


def condition_mlp(scalars: int, out_dim: int) -> int:
    """layers.ConditionMLP: Fourier features of ``scalars`` values -> Linear, SiLU, Linear."""
    return linear(scalars * FOURIER_DIM, out_dim) + linear(out_dim, out_dim)


# -- the predictor ---------------------------------------------------------------------------------


def _conv_out(size: int, stride: int) -> int:
    return (size + 2 - 3) // stride + 1  # 3x3, padding 1


def unet(cfg: PredictorConfig, channels: int, image_size: int, prompt_dim: int) -> int:
    """predictor.UNetBackbone, one image."""
    ch, cond = cfg.channels, 4 * cfg.channels[0]

    def res_block(c_in: int, c_out: int, size: int) -> int:
        skip = conv(c_in, c_out, 1, size, size) if c_in != c_out else 0
        return conv(c_in, c_out, 3, size, size) + linear(cond, 2 * c_out) + conv(c_out, c_out, 3, size, size) + skip

    total = condition_mlp(3 if cfg.grid_conditioning else 1, cond) + linear(prompt_dim, cond)
    size = image_size
    total += conv(channels, ch[0], 3, size, size)  # stem
    skips, c_prev = [], ch[0]
    for i, c in enumerate(ch):
        for _ in range(cfg.blocks_per_level):
            total += res_block(c_prev, c, size)
            skips.append(c)
            c_prev = c
        if i < len(ch) - 1:
            size = _conv_out(size, 2)
            total += conv(c, c, 3, size, size)  # strided downsampling
    total += res_block(c_prev, c_prev, size)  # middle
    for i, c in reversed(list(enumerate(ch))):
        for _ in range(cfg.blocks_per_level):
            total += res_block(c_prev + skips.pop(), c, size)
            c_prev = c
        if i > 0:
            size *= 2  # nearest upsampling: no multiply-adds
    return total + conv(c_prev, 2 * channels, 3, size, size)


def transformer(cfg: PredictorConfig, channels: int, image_size: int, prompt_dim: int, prompt_tokens: int = 1) -> int:
    """predictor.TransformerBackbone, one image: [condition, prompt tokens, patch tokens]."""
    p, W = cfg.patch_size, cfg.width
    N, D = (image_size // p) ** 2, channels * p * p
    total = condition_mlp(3 if cfg.grid_conditioning else 1, W) + linear(D, W, N) + linear(prompt_dim, W, prompt_tokens)
    total += cfg.depth * transformer_layer(1 + prompt_tokens + N, W, cfg.mlp_ratio)
    return total + linear(W, 2 * D, N)


def predictor_step(cfg: NTMConfig, guided: bool = False) -> int:
    """One call of f_P (``NTM.predict``); guidance runs the conditional and unconditional halves."""
    p = cfg.predictor
    if p.backbone == "unet":
        one = unet(p, cfg.channels, cfg.image_size, cfg.prompt.dim)
    else:
        one = transformer(p, cfg.channels, cfg.image_size, cfg.prompt.dim)
    return 2 * one if guided else one


def sampler_loop(cfg: NTMConfig, steps: int, guided: bool = False) -> int:
    """Algorithm 2, steps 1-2: ``steps`` predictor calls."""
    return steps * predictor_step(cfg, guided)


# -- the transporter -------------------------------------------------------------------------------


def _tokens(cfg: NTMConfig) -> tuple[int, int]:
    """(N tokens, D token dim) of the transporter."""
    p = cfg.transporter.patch_size
    return (cfg.image_size // p) ** 2, cfg.channels * p * p


def block_pass(tc: TransporterConfig, tokens: int, token_dim: int) -> int:
    """One parallel pass of a TarFlow block on a prefix of ``tokens`` tokens (``TarFlowBlock.params``:
    the forward direction and one Jacobi pass alike)."""
    W = tc.width
    return (linear(W, W) + linear(token_dim, W, tokens) + tc.layers_per_block * transformer_layer(tokens, W, tc.mlp_ratio)
            + linear(W, 2 * token_dim, tokens - 1))


def transporter_forward(cfg: NTMConfig) -> int:
    """f_T(x) with its log-det: the conditioning MLP and one pass per block."""
    tc = cfg.transporter
    if not tc.num_blocks:
        return 0
    N, D = _tokens(cfg)
    return condition_mlp(2, tc.width) + tc.num_blocks * block_pass(tc, N, D)


def inverse_sequential(cfg: NTMConfig) -> int:
    """f_T^-1 by sequential decoding: per block, N - 1 one-token steps against the fixed-size KV cache
    (``TarFlowBlock.decode_step``): attention is masked to the n + 1 filled slots but computed over all
    N, in torch as in the exported step graph."""
    tc = cfg.transporter
    if not tc.num_blocks:
        return 0
    N, D = _tokens(cfg)
    W = tc.width
    # every step is the pure step function: it projects the condition (W x W) again, as the step graph must
    per_block = (N - 1) * (linear(W, W) + linear(D, W) + tc.layers_per_block * transformer_layer(1, W, tc.mlp_ratio, keys=N)
                           + linear(W, 2 * D))
    return condition_mlp(2, W) + tc.num_blocks * per_block


def inverse_jacobi(cfg: NTMConfig, work: Sequence[Sequence[tuple[int, int]]]) -> int:
    """f_T^-1 by (Gauss-Seidel-)Jacobi passes. ``work[i]``: for block i, one (prefix length, passes)
    pair per segment, the prefix being the segment's end (plain Jacobi: [(N, passes)])."""
    tc = cfg.transporter
    if not tc.num_blocks:
        return 0
    D = _tokens(cfg)[1]
    return condition_mlp(2, tc.width) + sum(passes * block_pass(tc, end, D) for block in work for end, passes in block)


def jacobi_work(cfg: NTMConfig, passes: Sequence[int]) -> list[list[tuple[int, int]]]:
    """The ``inverse_jacobi`` work of plain Jacobi (one segment) with ``passes[i]`` passes on block i."""
    N = _tokens(cfg)[0]
    return [[(N, int(p))] for p in passes]


# -- the rest --------------------------------------------------------------------------------------


def text_encoder(cfg: NTMConfig) -> int:
    """The prompt encoder on one prompt: none for a label table (a lookup); for a text model the frozen
    MiniLM (``text_encoder.MiniLM``) on its ``max_tokens`` positions, padding included (the graph
    computes them): per layer the Q, K, V and output projections, attention, and the MLP."""
    if cfg.prompt.kind == "label":
        return 0
    m, P = MiniLMConfig(), cfg.prompt.max_tokens
    layer = (4 * linear(m.width, m.width, P) + attention(P, P, m.width) + linear(m.width, m.mlp_width, P)
             + linear(m.mlp_width, m.width, P))
    return m.layers * layer


def denoiser(den_cfg, prompt_tokens: int = 1) -> int:
    """g_phi (``denoiser.Denoiser``: a transformer backbone over u_t0 with the prompt as prefix, conditioned
    on t0 alone). ``den_cfg``: a ``DenoiserConfig`` or anything with its fields."""
    backbone = PredictorConfig(backbone="transformer", grid_conditioning=False, patch_size=den_cfg.patch_size,
                               width=den_cfg.width, depth=den_cfg.depth, heads=den_cfg.heads)
    return transformer(backbone, den_cfg.channels, den_cfg.image_size, den_cfg.prompt_dim, prompt_tokens)


def audit(cfg: NTMConfig, steps: int) -> int:
    """The exact trajectory NLL of one x trajectory: f_T on its T + 1 levels and T predictor steps."""
    return (steps + 1) * transporter_forward(cfg) + steps * predictor_step(cfg)
