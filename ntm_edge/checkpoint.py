"""Checkpoint directories: written atomically, verified on load.

    DIR/config.json         NTMConfig (everything needed to rebuild the model)
    DIR/model.safetensors   the weights used for sampling (the EMA weights in training)
    DIR/checkpoint.json     format version, training step, sha256 of model.safetensors
    DIR/train_state.pt      raw + EMA weights, optimizer, step, RNG state, run arguments (--resume)

Every file is written to a temporary name in DIR and renamed into place, so an interrupted save
never leaves a half-written file under a real name; checkpoint.json is renamed last and its hash
ties the weights to it, so a mix of two saves is detected on load.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import NTMConfig
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write, atomic_write_text, sha256_file

FORMAT_VERSION = 1
CONFIG, WEIGHTS, META, STATE = "config.json", "model.safetensors", "checkpoint.json", "train_state.pt"


def is_checkpoint(path) -> bool:
    p = Path(path)
    return (p / CONFIG).exists() or (p / STATE).exists()


def save_model(model, path, step: int | None = None, state_dict=None, info: dict | None = None) -> None:
    """Write config.json, model.safetensors (``state_dict`` or the model's own) and checkpoint.json
    (with ``info``: what the model was trained on, for `ntm-edge eval`)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in (state_dict or model.state_dict()).items()}
    atomic_write_text(path / CONFIG, model.config.to_json())
    atomic_write(path / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "ntm-edge"}))
    meta = {"format_version": FORMAT_VERSION, "step": step, "weights_sha256": sha256_file(path / WEIGHTS),
            **(info or {})}
    atomic_write_text(path / META, json.dumps(meta, indent=2))


def read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path.parent} holds no {path.name}: it is not an ntm-edge {what}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e.__class__.__name__}: {e}); {what} cannot be read") from None


def load_config(path) -> NTMConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    try:
        return NTMConfig.from_dict(read_json(path / CONFIG, "checkpoint"))
    except ConfigError as e:
        raise CheckpointError(f"{path / CONFIG}: {e}") from None


def load_info(path) -> dict:
    """checkpoint.json: format version, step, weights hash and what the model was trained on."""
    return read_json(Path(path) / META, "checkpoint")


def trained_on(path) -> str | None:
    """The dataset a checkpoint was trained on (checkpoint.json; older ones: train_state.pt), or None."""
    dataset = load_info(path).get("dataset")
    if dataset is None and (Path(path) / STATE).exists():
        dataset = load_train_state(path).get("args", {}).get("dataset")
    return dataset


def load_model(path, device: str = "cpu"):
    """Rebuild the model from DIR, verify the weights' hash and names, load them; eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .model import NTM

    path = Path(path)
    config = load_config(path)
    meta = load_info(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format_version')}, this ntm-edge reads {FORMAT_VERSION}")
    weights = path / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{path} holds no {WEIGHTS}")
    if sha256_file(weights) != meta.get("weights_sha256"):
        raise CheckpointError(f"{weights} does not match its recorded sha256: the file is corrupt or truncated")
    try:
        tensors = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} cannot be read ({e})") from None
    model = NTM(config)
    missing, unexpected = set(model.state_dict()) - set(tensors), set(tensors) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not fit its config.json ({len(missing)} missing, {len(unexpected)} unexpected tensors)"
        )
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{weights} does not fit its config.json ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()


def save_train_state(path, state: dict) -> None:
    import torch

    atomic_write(Path(path) / STATE, lambda tmp: torch.save(state, tmp))


def load_train_state(path) -> dict:
    import pickle

    import torch

    p = Path(path) / STATE
    if not p.exists():
        raise CheckpointError(f"{path} holds no {STATE}: nothing to resume (train without --resume)")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise CheckpointError(f"{p} is corrupt or truncated ({msg})") from None
