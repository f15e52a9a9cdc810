"""Parity of every exported graph: onnxruntime against the torch module it was traced from, on random
inputs and on real trajectories (forward trajectories of the checkpoint's held-out images, or the
model's own samples when its dataset cannot be loaded). The max abs error per graph goes into the
manifest and the export log.
"""

from __future__ import annotations

import numpy as np
import torch

from ntm_edge import schedule
from ntm_edge.captions import HELDOUT_PARAPHRASES, TEMPLATES, all_captions
from ntm_edge.errors import NtmError
from ntm_edge.model import NTM, Trajectory
from ntm_edge.numerics import dequantize, patchify, unpatchify
from ntm_edge.prompts import TextVocab
from ntm_edge.runtime import inversion, specs
from ntm_edge.runtime.session import NUMPY_DTYPES, Runtime
from ntm_edge.runtime.specs import GraphSpec


def random_inputs(spec: GraphSpec, config, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs for ``spec`` in the ranges the runtime feeds: t in [t_min, 1] (with t = 1 included, the
    transporter's identity gate), s in (0, t), T in {4, 8, 16}, ids over the vocabulary, a decoding
    position inside the sequence, a real time grid; everything else N(0, 1)."""
    out: dict[str, np.ndarray] = {}
    v: np.ndarray
    num_tokens = len(config.prompt.class_names) + 1
    tc = config.transporter
    for t in spec.inputs:
        shape = t.resolve({"batch": batch})
        if t.name == "ids" and config.prompt.kind != "label":
            v = random_text_ids(shape, rng)
        elif t.name == "ids":
            v = rng.integers(0, num_tokens, shape)
        elif t.name in ("prompt_mask", "null_mask"):
            v = np.ones(shape, dtype=bool)
        elif t.name == "t":
            v = rng.uniform(config.t_min_sample, 1.0, shape)
            v[-1] = 1.0
        elif t.name == "s":
            v = out["t"] * rng.uniform(0.05, 0.95, shape)
        elif t.name == "steps":
            v = rng.choice([4.0, 8.0, 16.0], shape)
        elif t.name == "position":
            v = rng.integers(0, max(1, (config.image_size // tc.patch_size) ** 2 - 1), shape)
        elif t.name == "levels_t":
            v = schedule.time_grid(config.steps, config.t_min_sample, config.shift)
        elif t.name == "guidance":
            v = rng.uniform(0.0, 3.0, shape)
        else:
            v = rng.standard_normal(shape)
        out[t.name] = np.asarray(v).astype(NUMPY_DTYPES[t.dtype])
    return out


def random_text_ids(shape, rng: np.random.Generator) -> np.ndarray:
    """Word-piece ids (B, P) as the tokenizer lays them out: [CLS] (101), 1 .. P - 2 random word pieces
    (ids 999 .. 30521), [SEP] (102), then [PAD] (0)."""
    B, P = shape
    ids = np.zeros((B, P), dtype=np.int64)
    for i, n in enumerate(rng.integers(1, P - 1, B)):
        ids[i, 0], ids[i, 1 : n + 1], ids[i, n + 1] = 101, rng.integers(999, 30522, n), 102
    return ids


@torch.no_grad()
def torch_outputs(module, spec: GraphSpec, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = module(*(torch.from_numpy(inputs[n]) for n in spec.input_names))
    out = out if isinstance(out, tuple) else (out,)
    return {name: o.numpy() for name, o in zip(spec.output_names, out, strict=True)}


def max_abs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, float]:
    """(max abs difference over all outputs, max abs of the reference outputs)."""
    err = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in b)
    scale = max(float(np.max(np.abs(b[k]))) for k in b)
    return err, scale


def real_trajectories(model: NTM, checkpoint, n: int = 16, seed: int = 0):
    """Trajectories x (n, K, C, H, W) with ts (n, K), prompt ids (n, 1) and where they came from."""
    from ntm_edge.checkpoint import trained_on
    from ntm_edge.data import load_dataset
    from ntm_edge.exits import invert_levels

    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    try:
        dataset = trained_on(checkpoint)
        data = load_dataset(dataset, "test", image_size=cfg.image_size, channels=cfg.channels) if dataset else None
    except NtmError:
        data = None
    if data is not None and tuple(data.class_names) == tuple(cfg.prompt.class_names):
        x0 = dequantize(torch.from_numpy(data.images[:n]), g)
        ids = torch.from_numpy(model.vocab.ids_for_labels(data.labels[:n]))
        return model.forward_trajectory(x0, cfg.steps, generator=g), ids, f"held-out images of {dataset}"
    ids = torch.from_numpy(model.vocab.ids_for_labels(np.arange(n) % len(cfg.prompt.class_names)))
    u, ts = model.sample_levels(ids, model.vocab.mask_of(ids), cfg.steps, np.random.default_rng(seed),
                                0.0, cfg.t_min_sample)
    with torch.no_grad():
        return invert_levels(model, u, ts), ids, "the model's own samples"


def parity_prompt_ids(vocab) -> np.ndarray:
    """The real prompts a prompt encoder is checked on: every label id, or for a text model the
    training templates and the held-out paraphrases of every class, and ''."""
    if not isinstance(vocab, TextVocab):
        return np.arange(vocab.num_tokens)[:, None]
    prompts = [c for per_class in all_captions(vocab.class_names, TEMPLATES + HELDOUT_PARAPHRASES) for c in per_class]
    return vocab.tokenize(sorted(set(prompts)) + [""])[0]


MIN_TEXT_COSINE = 0.999  # the text encoder graph against the torch MiniLM, every real token of every prompt


@torch.no_grad()
def text_encoder_agreement(rt: Runtime, module, vocab: TextVocab) -> dict:
    """The text prompt-encoder graph against its torch module on the real prompts (``parity_prompt_ids``):
    the lowest cosine between the two 384-d states of a real token, the max abs error over all
    positions, and whether padding is exactly zero in the graph's output."""
    ids = parity_prompt_ids(vocab)  # (N, P)
    got = rt[specs.PROMPT_ENCODER](ids=ids)["prompt_emb"]  # (N, P, E)
    ref = module(torch.from_numpy(ids)).numpy()
    real = vocab.mask_of(ids)  # (N, P) real tokens
    a, b = got[real].astype(np.float64), ref[real].astype(np.float64)  # (tokens, E)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"prompts": len(ids), "tokens": int(real.sum()), "min_cosine": float(cos.min()),
            "max_abs": float(np.abs(got - ref).max()), "padding_zero": bool((got[~real] == 0).all())}


@torch.no_grad()
def block_io(model: NTM, x: torch.Tensor, t: torch.Tensor, T: int,
             context: torch.Tensor | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input, output) images of every transporter block for x (B, C, H, W) at levels t (B,) (given the
    step's x_t ``context`` for a contextual transporter)."""
    tr = model.transporter
    c, gate = tr.conditioning(x, t, T, context)
    p, chw = tr.cfg.patch_size, x.shape[1:]
    h, io = patchify(x, p), []
    ctx = None if context is None else patchify(context, p)
    for block in tr.blocks:
        h_out, _ = block(h, c, gate, ctx)
        io.append((unpatchify(h, p, *chw).numpy(), unpatchify(h_out, p, *chw).numpy()))
        h = h_out
    return io


@torch.no_grad()
def real_parity(rt: Runtime, model: NTM, modules: dict, traj: Trajectory, ids: torch.Tensor, seed: int = 0) -> dict:
    """Max abs error (and reference scale) of every graph on inputs taken from real trajectories."""
    cfg = model.config
    B, K = traj.t.shape
    T = K - 1
    shape = traj.x.shape[2:]
    x, t, context = model.transporter_inputs(traj)  # every level (a contextual model: each below the top, given the next)
    steps_all = torch.full((len(t),), float(T))
    mask = model.vocab.mask_of(ids)
    null_ids, null_mask = model.null_prompt(len(ids))
    result = {}

    def check(name: str, inputs: dict):
        spec = rt.bundle.graphs[name]
        inputs = {s.name: np.asarray(inputs[s.name].numpy() if isinstance(inputs[s.name], torch.Tensor) else inputs[s.name],
                                     dtype=NUMPY_DTYPES[s.dtype]) for s in spec.inputs}
        ref = torch_outputs(modules[name], spec, inputs)
        result[name] = max_abs(rt[name](**inputs), ref)

    check(specs.PROMPT_ENCODER, {"ids": torch.from_numpy(parity_prompt_ids(model.vocab))})
    u = model.transporter_levels(traj)[0]  # (B, K, C, H, W)
    emb = model.prompt_encoder(ids)
    rep = lambda v: v.repeat_interleave(T, dim=0)  # noqa: E731  (B, ...) -> (B*T, ...)
    read = traj.x if model.contextual else u  # the level the predictor reads: x_t, or u_t
    check(specs.PREDICTOR_STEP, {"u_t": read[:, 1:].reshape(B * T, *shape), "t": traj.t[:, 1:].reshape(-1),
                                 "s": traj.t[:, :-1].reshape(-1), "steps": torch.full((B * T,), float(T)),
                                 "prompt_emb": rep(emb), "prompt_mask": rep(mask)})
    rng = np.random.default_rng(seed)
    if specs.SAMPLER_LOOP in modules:
        check(specs.SAMPLER_LOOP, {"u_top": rng.standard_normal((B, *shape), dtype=np.float32),
                                   "noise": rng.standard_normal((B, T, *shape), dtype=np.float32),
                                   "levels_t": schedule.time_grid(T, cfg.t_min_sample, cfg.shift).astype(np.float32),
                                   "prompt_emb": emb, "null_emb": model.prompt_encoder(null_ids),
                                   "prompt_mask": mask, "null_mask": null_mask,
                                   "guidance": np.array([1.0], dtype=np.float32)})
    if len(model.transporter.blocks):
        ctx = {} if context is None else {"context": context}
        ctx2 = {} if context is None else {"context": context.repeat(2, 1, 1, 1)}
        check(specs.TRANSPORTER_FORWARD, {"x": x, "t": t, "steps": steps_all, **ctx})
        for i, (h_in, h_out) in enumerate(block_io(model, x, t, T, context)):
            # the first pass (x = u) and the fixed point (x = the block's input)
            check(specs.jacobi_graph(i), {"x": np.concatenate([h_out, h_in]), "u": np.concatenate([h_out, h_out]),
                                          "t": t.repeat(2), "steps": steps_all.repeat(2), **ctx2})
            # the decoding step over a whole sequence: N - 1 graph calls against TarFlowBlock.inverse
            tr, block = model.transporter, model.transporter.block(i)
            c, gate = tr.conditioning(x, t, T, context)
            p = tr.cfg.patch_size
            ref = block.inverse(patchify(torch.from_numpy(h_out), p), c, gate,
                                None if context is None else patchify(context, p))
            ref = unpatchify(ref, p, *shape).numpy()
            got = inversion.sequential_block(rt, i, h_out, t.numpy(), steps_all.numpy(),
                                             None if context is None else context.numpy())
            result[specs.step_graph(i)] = max_abs({"x": got}, {"x": ref})
    if specs.DENOISER in modules:  # ids for a label model's denoiser, the prompt tokens for a text model's
        check(specs.DENOISER, {"u": u[:, 0], "ids": ids, "prompt_emb": emb, "prompt_mask": mask})
    return result
