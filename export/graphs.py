"""One pure function per exported graph (docs/design.md 5): thin ``nn.Module`` wrappers that call the
model's own functions, with the inputs and outputs of ``ntm_edge.runtime.specs`` in that order.
Nothing is written here twice: the sampler loop is ``sampling.reverse_levels`` with the guided
predictor, the decoding step is ``TarFlowBlock.decode_step``, the Jacobi pass ``TarFlowBlock.jacobi_step``.

Pure means: no state on the modules, no mode flags, no value-dependent Python branches, no in-place
slice writes, so the traced graph is the function for every input.
"""

from __future__ import annotations

import torch
from torch import nn

from ntm_edge.model import NTM
from ntm_edge.numerics import guided_gaussian, patchify, unpatchify
from ntm_edge.runtime import specs
from ntm_edge.sampling import reverse_levels


class PromptEncoderGraph(nn.Module):
    """ids (B, P) -> prompt_emb (B, P, E): the label table, or the frozen MiniLM itself (its pure
    ``TextPromptEncoder.embed``, without the cache), padding zeroed. A text model's graph file is not
    traced from this module but built by ``runtime.text_graph`` (torch-free, deterministic bytes);
    this module is then the torch reference the export checks that file against."""

    def __init__(self, model: NTM):
        super().__init__()
        enc = model.prompt_encoder
        self.encoder = enc
        self.text = model.config.prompt.kind != "label"
        if self.text:
            self.minilm = enc.minilm  # a submodule here, so that its weights are traced as constants

    def forward(self, ids):
        return self.encoder.embed(ids) if self.text else self.encoder(ids)


class PredictorStepGraph(nn.Module):
    """u_t (B, C, H, W), t, s, steps (B,), prompt_emb (B, P, E), prompt_mask (B, P) -> mu, log_sigma."""

    def __init__(self, model: NTM):
        super().__init__()
        self.predictor = model.predictor

    def forward(self, u_t, t, s, steps, prompt_emb, prompt_mask):
        mu, log_sigma, _ = self.predictor(u_t, t, s, steps, prompt_emb, prompt_mask)
        return mu, log_sigma


class SamplerLoopGraph(nn.Module):
    """Algorithm 2, steps 1-2, unrolled for T = model.config.steps, guided (C.5).

    u_top (B, C, H, W), noise (B, T, C, H, W), levels_t (T + 1,), prompt_emb, null_emb (B, P, E),
    prompt_mask, null_mask (B, P), guidance (1,) -> u_levels (B, T + 1, C, H, W), ordered t_0 .. t_T.
    Every step runs the conditional and unconditional halves as one batch of 2B (as ``NTM.predict``);
    guidance = 0 gives the conditional model exactly (no branch on its value).
    """

    def __init__(self, model: NTM):
        super().__init__()
        self.predictor, self.steps = model.predictor, model.config.steps

    def forward(self, u_top, noise, levels_t, prompt_emb, null_emb, prompt_mask, null_mask, guidance):
        B = u_top.shape[0]
        ones = torch.ones_like(u_top[:, 0, 0, 0]).repeat(2)  # (2B,)
        emb, mask = torch.cat([prompt_emb, null_emb]), torch.cat([prompt_mask, null_mask])  # (2B, P, ...)

        def predict(u, t, s):
            mu, ls, _ = self.predictor(torch.cat([u, u]), ones * t, ones * s, ones * float(self.steps), emb, mask)
            return guided_gaussian(mu[:B], ls[:B], mu[B:], ls[B:], guidance)  # conditional half, unconditional half

        z = [u_top] + [noise[:, k - 1] for k in range(self.steps, 0, -1)]  # draw order: u_T, then levels T-1 .. 0
        return reverse_levels(predict, z, levels_t)  # (B, T + 1, C, H, W)


def _context(context: tuple) -> torch.Tensor | None:
    """A contextual transporter's graphs take the step's x_t (B, C, H, W) as one last input."""
    return context[0] if context else None


class TransporterForwardGraph(nn.Module):
    """x (B, C, H, W), t, steps (B,) [, context (B, C, H, W)] -> u (B, C, H, W), logdet (B,)."""

    def __init__(self, model: NTM):
        super().__init__()
        self.transporter = model.transporter

    def forward(self, x, t, steps, *context):
        return self.transporter(x, t, steps, context=_context(context))


class _BlockGraph(nn.Module):
    def __init__(self, model: NTM, block: int):
        super().__init__()
        self.transporter, self.block = model.transporter, model.transporter.block(block)
        cfg = model.config
        self.p, self.chw = cfg.transporter.patch_size, (cfg.channels, cfg.image_size, cfg.image_size)


class JacobiPassGraph(_BlockGraph):
    """One Jacobi pass of one block, in image layout: x, u (B, C, H, W), t, steps (B,) [, context
    (B, C, H, W)] -> x_next.

    x_next = mu(x_<n) + exp(alpha(x_<n)) u_n per token (``TarFlowBlock.jacobi_step``); the exact
    inverse of the block is its fixed point, reached after at most N - 1 passes."""

    def forward(self, x, u, t, steps, *context):
        ctx = _context(context)
        c, gate = self.transporter.conditioning(x, t, steps, ctx)  # (B, W), (B, 1, 1)
        xs = self.block.scan_order(patchify(x, self.p))  # (B, N, D) scan order
        us = self.block.scan_order(patchify(u, self.p))
        ctx_h = self.block.context_tokens(None if ctx is None else patchify(ctx, self.p))
        out = self.block.scan_order(self.block.jacobi_step(xs, us, c, gate, ctx_h))  # (B, N, D) natural order
        return unpatchify(out, self.p, *self.chw)  # (B, C, H, W)


class SequentialStepGraph(_BlockGraph):
    """One step of sequential decoding of one block with its KV cache in fixed-size buffers.

    x_token (B, D): token n in scan order; position (1,) int64: n; t, steps (B,);
    k_cache, v_cache (L, B, heads, N, hd): keys/values of tokens < n in slots < n (the rest unused)
    [, context (B, C, H, W): the step's x_t, the whole image: position n reads its own shifted token]
    -> mu, alpha (B, D): the affine parameters of token n + 1 (x_{n+1} = mu + exp(alpha) u_{n+1}),
       k_cache_out, v_cache_out: the caches with token n written into slot n.
    It is ``TarFlowBlock.decode_step``, the step that ``TarFlowBlock.inverse`` runs N - 1 times.
    """

    def forward(self, x_token, position, t, steps, k_cache, v_cache, *context):
        ctx = _context(context)
        c, gate = self.transporter.conditioning(x_token, t, steps, ctx)
        ctx_h = self.block.context_tokens(None if ctx is None else patchify(ctx, self.p))
        mu, alpha, ks, vs = self.block.decode_step(x_token, position, c, gate, k_cache, v_cache,
                                                   ctx_h=ctx_h)  # one-hot writes
        return mu, alpha, torch.stack(ks), torch.stack(vs)


class DenoiserGraph(nn.Module):
    """u (B, C, H, W), ids (B, P), prompt_mask (B, P) -> x0 (B, C, H, W): a label model's denoiser,
    which embeds the ids with its own copy of the label table."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, u, ids, prompt_mask):
        return self.denoiser(u, ids, prompt_mask)


class TextDenoiserGraph(nn.Module):
    """u (B, C, H, W), prompt_emb (B, P, E), prompt_mask (B, P) -> x0 (B, C, H, W): a text model's
    denoiser, given the prompt-encoder graph's output (the frozen MiniLM it shares with the NTM)."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, u, prompt_emb, prompt_mask):
        return self.denoiser.denoise(u, prompt_emb, prompt_mask)


def graph_modules(model: NTM, denoiser=None) -> dict[str, nn.Module]:
    """The module of every graph ``specs.graph_specs`` lists for this model, by graph name."""
    mods: dict[str, nn.Module] = {
        specs.PROMPT_ENCODER: PromptEncoderGraph(model),
        specs.PREDICTOR_STEP: PredictorStepGraph(model),
    }
    if not model.contextual:  # a contextual sampler inverts f_T after every draw: no unrolled loop
        mods[specs.SAMPLER_LOOP] = SamplerLoopGraph(model)
    if len(model.transporter.blocks):
        mods[specs.TRANSPORTER_FORWARD] = TransporterForwardGraph(model)
        for i in range(len(model.transporter.blocks)):
            mods[specs.jacobi_graph(i)] = JacobiPassGraph(model, i)
            mods[specs.step_graph(i)] = SequentialStepGraph(model, i)
    if denoiser is not None:
        text = denoiser.config.prompt_kind != "label"
        mods[specs.DENOISER] = TextDenoiserGraph(denoiser) if text else DenoiserGraph(denoiser)
    return {name: m.eval() for name, m in mods.items()}
