"""Calibration inputs from real data, for every graph that INT8 quantizes (torch side).

Two sources, both drawn with ``PrecisionOptions.calib_seed``:

1. Forward trajectories of ``calib_images`` images of the TRAINING split, at every level of the
   T-step schedule (t_0 = the sampling t_min, ..., t_T = 1), mapped to u-space by the transporter.
   Every step k feeds the predictor (u_tk, t_k, t_k-1, T) twice: with the image's prompt and with the
   null prompt, as classifier-free guidance runs it (the conditional and unconditional halves). A
   contextual transporter's predictor reads x_tk instead, and its transporter graphs take each level
   with the next one up as their context.
2. The sampler's own trajectories (Algorithm 2) for ``calib_samples`` prompts cycling over the classes,
   half at guidance 0 and half at ``calib_guidance``: the predictor sees its own outputs at every step,
   a range that real trajectories do not cover. The unrolled sampler graph is calibrated on exactly
   these runs (its inputs are the noises); the denoiser on the u_t0 they end in and on the forward
   trajectories' u_t0 at the denoiser's level.

Prompts are the dataset's classes: label ids, or for a text model the word pieces of each class name
(``vocab.ids_for_labels``), with the model's own null prompt and masks.

``calibration_batches`` returns, per graph, a list of input dicts (numpy, the graph's IO names) of at
most ``batch`` rows each: what ``onnxruntime.quantization``'s calibration reader feeds.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import schedule
from ..checkpoint import trained_on
from ..data import load_dataset
from ..errors import ConfigError
from ..model import NTM, Trajectory
from ..numerics import dequantize
from ..runtime import specs
from .policy import PrecisionOptions


def _training_images(model: NTM, checkpoint, n: int, rng: np.random.Generator):
    """n training images (uint8 (n, H, W, C)) and their prompt ids (n, 1), drawn without replacement."""
    cfg = model.config
    dataset = trained_on(checkpoint)
    if dataset is None:
        raise ConfigError(f"{checkpoint} does not record its dataset: INT8 calibration needs its training images")
    data = load_dataset(dataset, "train", image_size=cfg.image_size, channels=cfg.channels)
    if tuple(data.class_names) != tuple(cfg.prompt.class_names):
        raise ConfigError(f"{dataset} has classes {data.class_names}, the model {cfg.prompt.class_names}")
    idx = rng.choice(len(data.images), size=min(n, len(data.images)), replace=False)
    return data.images[idx], model.vocab.ids_for_labels(data.labels[idx])


@torch.no_grad()
def _forward_levels(model: NTM, images: np.ndarray, seed: int, t_min: float):
    """x and u = f_T(x) at every level of forward trajectories: (n, K, C, H, W) each, ts (n, K). A contextual
    transporter maps each level given the next (``NTM.transporter_levels``)."""
    g = torch.Generator().manual_seed(seed)
    x0 = dequantize(torch.from_numpy(images), g)
    traj = model.forward_trajectory(x0, model.config.steps, generator=g, t_min=t_min)
    return traj.x, model.transporter_levels(traj)[0], traj.t


def _predictor_rows(model: NTM, u: torch.Tensor, ts: torch.Tensor, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """Predictor inputs of every step of trajectories u (n, K, ...) on grids ts (n, K), once with the
    prompts and once with the null prompt -> rows (2 n T, ...). ids (n, P): label ids or word pieces."""
    n, K = ts.shape
    T = K - 1
    null_ids, null_mask = model.null_prompt(n)
    halves = ((model.prompt_encoder(ids), model.vocab.mask_of(ids)), (model.prompt_encoder(null_ids), null_mask))
    rows: dict[str, list] = {"u_t": [], "t": [], "s": [], "steps": [], "prompt_emb": [], "prompt_mask": []}
    for k in range(1, K):
        for emb, mask in halves:
            rows["u_t"].append(u[:, k])
            rows["t"].append(ts[:, k])
            rows["s"].append(ts[:, k - 1])
            rows["steps"].append(torch.full((n,), float(T)))
            rows["prompt_emb"].append(emb)
            rows["prompt_mask"].append(mask)
    return {k: torch.cat(v).numpy() for k, v in rows.items()}


def _batches(rows: dict[str, np.ndarray], batch: int, names: list[str]) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(rows.values())))
    return [{k: np.ascontiguousarray(rows[k][i : i + batch]) for k in names} for i in range(0, n, batch)]


def _cat(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def calibration_batches(model: NTM, checkpoint, graphs: dict[str, specs.GraphSpec], opts: PrecisionOptions,
                        denoiser=None, batch: int = 64) -> dict[str, list[dict[str, np.ndarray]]]:
    """Calibration inputs for each graph in ``graphs`` (name -> its IO spec) -> {name: [input dict, ...]}."""
    cfg = model.config
    T = cfg.steps
    rng = np.random.default_rng(opts.calib_seed)
    images, ids_np = _training_images(model, checkpoint, opts.calib_images, rng)
    ids = torch.from_numpy(ids_np)
    x, u, ts = _forward_levels(model, images, opts.calib_seed, cfg.t_min_sample)

    # the sampler's own trajectories: half at guidance 0, half at calib_guidance
    m = opts.calib_samples
    s_ids = torch.from_numpy(model.vocab.ids_for_labels(np.arange(m) % len(cfg.prompt.class_names)))  # every class
    s_mask = model.vocab.mask_of(s_ids)
    weights = [0.0] * (m - m // 2) + [opts.calib_guidance] * (m // 2)
    sampled = []  # (ids, u levels (b, K, ...), grid (K,), guidance, noise list)
    for j, w in enumerate(sorted(set(weights))):
        sel = [i for i, v in enumerate(weights) if v == w]
        levels, grid = model.sample_levels(s_ids[sel], s_mask[sel], T, np.random.default_rng([opts.calib_seed, 1, j]),
                                           w, cfg.t_min_sample)
        sampled.append((s_ids[sel], levels, grid, w))

    out: dict[str, list[dict[str, np.ndarray]]] = {}
    for name, spec in graphs.items():
        names = spec.input_names
        if name == specs.PREDICTOR_STEP:
            parts = [_predictor_rows(model, x if model.contextual else u, ts, ids)]  # what the predictor reads
            for s_id, levels, grid, _ in sampled:  # x levels for a contextual model: what its predictor reads
                grid_t = torch.as_tensor(grid, dtype=torch.float32).expand(len(s_id), len(grid))
                parts.append(_predictor_rows(model, levels, grid_t, s_id))
            out[name] = _batches(_cat(*parts), batch, names)
        elif name == specs.SAMPLER_LOOP:
            out[name] = []
            for j, (s_id, _, _, w) in enumerate(sampled):
                noise_rng = np.random.default_rng([opts.calib_seed, 2, j])
                null_ids, null_mask = model.null_prompt(len(s_id))
                shape = (len(s_id), cfg.channels, cfg.image_size, cfg.image_size)
                rows = {"u_top": noise_rng.standard_normal(shape, dtype=np.float32),
                        "noise": noise_rng.standard_normal((shape[0], T, *shape[1:]), dtype=np.float32),
                        "prompt_emb": model.prompt_encoder(s_id).numpy(),
                        "null_emb": model.prompt_encoder(null_ids).numpy(),
                        "prompt_mask": model.vocab.mask_of(s_id).numpy(), "null_mask": null_mask.numpy()}
                for b in _batches(rows, batch, list(rows)):
                    b["levels_t"] = schedule.time_grid(T, cfg.t_min_sample, cfg.shift).astype(np.float32)
                    b["guidance"] = np.array([w], dtype=np.float32)
                    out[name].append(b)
        elif name == specs.DENOISER:
            if denoiser is None:
                raise ConfigError("the bundle lists a denoiser graph but the checkpoint has no denoiser")
            t0 = denoiser.config.t0
            _, u_den, _ = _forward_levels(model, images, opts.calib_seed, t0)
            levels, _ = model.sample_levels(s_ids, s_mask, T, np.random.default_rng([opts.calib_seed, 3]), 0.0, t0)
            all_ids = torch.cat([ids, s_ids])  # (n + m, P)
            rows = {"u": torch.cat([u_den[:, 0], levels[:, 0]]).numpy(), "ids": all_ids.numpy(),
                    "prompt_mask": model.vocab.mask_of(all_ids).numpy()}
            if "prompt_emb" in names:  # a text model's denoiser reads the (shared, frozen) MiniLM's output
                rows["prompt_emb"] = model.prompt_encoder(all_ids).numpy()
            out[name] = _batches(rows, batch, names)
        elif name == specs.TRANSPORTER_FORWARD:
            flat_x, flat_t, context = model.transporter_inputs(Trajectory(x, ts))
            rows = {"x": flat_x.numpy(), "t": flat_t.numpy(), "steps": np.full(len(flat_t), float(T), dtype=np.float32)}
            if context is not None:
                rows["context"] = context.numpy()
            out[name] = _batches(rows, batch, names)
        elif name.startswith("transporter_jacobi_"):
            from ..export.parity import block_io

            flat_x, flat_t, context = model.transporter_inputs(Trajectory(x, ts))
            h_in, h_out = block_io(model, flat_x, flat_t, T, context)[int(name.rsplit("_", 1)[1])]
            # the first pass (x = u) and the fixed point (x = the block's input): the range Jacobi sweeps
            rows = {"x": np.concatenate([h_out, h_in]), "u": np.concatenate([h_out, h_out]),
                    "t": np.tile(flat_t.numpy(), 2), "steps": np.full(2 * len(flat_t), float(T), dtype=np.float32)}
            if context is not None:
                rows["context"] = np.concatenate([context.numpy()] * 2)
            out[name] = _batches(rows, batch, names)
        else:
            raise ConfigError(f"no calibration data is defined for graph {name!r}")
    return out
