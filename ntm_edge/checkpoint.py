"""Checkpoint directories: written as one atomic save, every file verified on load.

    DIR/config.json         NTMConfig (everything needed to rebuild the model)
    DIR/model.safetensors   the weights used for sampling (the EMA weights in training)
    DIR/train_state.pt      raw + EMA weights, optimizer, step, RNG state, run arguments (--resume)
    DIR/checkpoint.json     format version, training step, what the model was trained on, the
                            sha256 of each file above and of its own other fields

A save writes every file to a temporary name first and renames them into place only once all are
written (``fileio.StagedWrites``), checkpoint.json last: a save that fails (a full disk, a signal)
leaves the previous checkpoint as it was, and one whose writer is killed during the renames is
completed by the next load (``finish_interrupted``). On load each file must match the sha256 that
checkpoint.json records, checkpoint.json must match its own, the config must describe a model, and
every tensor must have the name and shape that the config asks for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, cast

from .config import NTMConfig
from .errors import CheckpointError, ConfigError
from .fileio import StagedWrites, finish_interrupted_save, is_sealed, read_json_object, seal, sha256_file

# 2: checkpoint.json is sealed and hashes config.json (and train_state.pt). 1: it hashed the weights only.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG, WEIGHTS, META, STATE = "config.json", "model.safetensors", "checkpoint.json", "train_state.pt"
HASHED = {STATE: "train_state_sha256", CONFIG: "config_sha256", WEIGHTS: "weights_sha256"}  # in checkpoint.json
STATE_KEYS = ("step", "model", "ema", "optimizer", "generator", "args", "config", "history")


def is_checkpoint(path) -> bool:
    p = Path(path)
    return (p / CONFIG).exists() or (p / STATE).exists()


def save_model(model, path, step: int | None = None, state_dict=None, info: dict | None = None) -> None:
    """Write config.json, model.safetensors (``state_dict`` or the model's own) and checkpoint.json
    (with ``info``: what the model was trained on, for `ntm-edge eval`)."""
    _save(model.config, state_dict or model.state_dict(), Path(path), step, info, train_state=None)


def save_training_checkpoint(path, config: NTMConfig, state: dict, info: dict) -> None:
    """A training checkpoint: ``state`` (see STATE_KEYS; whole tensors) as train_state.pt for --resume,
    and its EMA weights, the ones to sample from, as model.safetensors; all hashed in checkpoint.json."""
    _save(config, state["ema"], Path(path), state["step"], info, train_state=state)


def _save(config: NTMConfig, state_dict: dict, path: Path, step, info, train_state) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    meta = {"format_version": FORMAT_VERSION, "step": step, **(info or {})}
    with StagedWrites() as staged:  # nothing under a real name changes until every file is written
        if train_state is not None:
            tmp = staged.write(path / STATE, lambda tmp: torch_save(train_state, tmp))
            meta["train_state_sha256"] = sha256_file(tmp)
        tmp = staged.write(path / CONFIG, lambda tmp: Path(tmp).write_text(config.to_json()))
        meta["config_sha256"] = sha256_file(tmp)
        weights = save(tensors, metadata={"format": "ntm-edge"})  # bytes: a full disk is an OSError
        tmp = staged.write(path / WEIGHTS, lambda tmp: Path(tmp).write_bytes(weights))
        meta["weights_sha256"] = sha256_file(tmp)
        staged.write(path / META, lambda tmp: Path(tmp).write_text(json.dumps(seal(meta), indent=2)))


class _Writes:
    """A file that remembers the OSError of a failed write: torch.save turns it into a RuntimeError
    without the reason ("unexpected pos ..."), and a full disk should say "No space left on device"."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj, path) -> None:
    """torch.save to ``path``; a failed write raises its OSError (ENOSPC, EFBIG, ...)."""
    import torch

    with open(path, "wb") as f:
        out = _Writes(f)
        try:
            torch.save(obj, cast(IO[bytes], out))
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise


def read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path.parent} holds no {path.name}: it is not an ntm-edge {what}")
    try:
        return read_json_object(path)
    except ValueError as e:
        raise CheckpointError(f"{path} is corrupt ({e}); {what} cannot be read") from None


def verify_file(path: Path, recorded, remedy: str = "") -> None:
    """``path`` exists and matches its recorded sha256, or a CheckpointError says which it is not."""
    if not path.exists():
        raise CheckpointError(f"{path.parent} holds no {path.name}{remedy}")
    if sha256_file(path) != recorded:
        raise CheckpointError(f"{path} does not match its recorded sha256: the file is corrupt, truncated "
                              f"or was edited{remedy}")


def finish_interrupted(path) -> bool:
    """Complete a save that a killed writer left half renamed (fileio.finish_interrupted_save);
    True when it did. A directory that cannot be written is left as it is."""
    try:
        return finish_interrupted_save(Path(path), META, HASHED)
    except OSError:
        return False


def load_info(path) -> dict:
    """checkpoint.json (verified): format version, step, what the model was trained on, file hashes."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    finish_interrupted(path)
    meta = read_json(path / META, "checkpoint")
    version = meta.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path / META} has checkpoint format {version}, this ntm-edge reads "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    if version >= 2 and not is_sealed(meta):
        raise CheckpointError(f"{path / META} does not match its recorded sha256: the file is corrupt or was edited")
    return meta


def load_config(path) -> NTMConfig:
    """config.json, verified against checkpoint.json and validated."""
    path = Path(path)
    meta = load_info(path)
    if meta["format_version"] >= 2:
        verify_file(path / CONFIG, meta.get("config_sha256"))
    try:
        return NTMConfig.from_dict(read_json(path / CONFIG, "checkpoint"))
    except ConfigError as e:
        raise CheckpointError(f"{path / CONFIG}: {e}") from None


def trained_on(path) -> str | None:
    """The dataset a checkpoint was trained on (checkpoint.json; older ones: train_state.pt), or None."""
    dataset = load_info(path).get("dataset")
    if dataset is None and (Path(path) / STATE).exists():
        dataset = load_train_state(path).get("args", {}).get("dataset")
    return dataset


def trained_steps(path) -> tuple[int, ...] | None:
    """The step counts T a checkpoint was trained at (checkpoint.json; older ones: the arguments in
    train_state.pt), or None: flow matching (any T), or not recorded."""
    from .config import PRESET_MODES
    from .schedule import trained_step_counts

    info = load_info(path)
    if "trained_steps" in info:
        return tuple(int(T) for T in info["trained_steps"]) if info["trained_steps"] else None
    if not (Path(path) / STATE).exists():
        return None
    try:
        args, config = load_train_state(path).get("args", {}), load_config(path)
    except CheckpointError:  # a train state that cannot be verified (format 1): not read, the record is unknown
        return None
    mode = args.get("mode") or PRESET_MODES.get(args.get("preset", ""), "pairwise")
    return trained_step_counts(config.objective, mode, args.get("pairwise_steps"), config.steps)


def check_tensors(tensors: dict, expected: dict, source) -> None:
    """``tensors`` (name -> tensor) has exactly the names, shapes and dtypes of ``expected`` (a
    module's state_dict); otherwise one CheckpointError that names the first mismatch."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        first = f"no tensor {missing[0]!r}" if missing else f"an unknown tensor {unexpected[0]!r}"
        raise CheckpointError(f"{source} does not fit its config: {first} ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected tensors)")
    for name, ref in expected.items():
        t = tensors[name]
        if not hasattr(t, "shape") or not hasattr(t, "dtype"):
            raise CheckpointError(f"{source} does not fit its config: {name} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{source} does not fit its config: {name} has shape {tuple(t.shape)}, "
                                  f"the config needs {tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            raise CheckpointError(f"{source} does not fit its config: {name} is {t.dtype}, the model needs {ref.dtype}")


def load_model(path, device: str = "cpu"):
    """Rebuild the model from DIR, verify every file's hash and every tensor's name and shape; eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .model import NTM

    path = Path(path)
    config = load_config(path)
    meta = load_info(path)
    weights = path / WEIGHTS
    verify_file(weights, meta.get("weights_sha256"))
    try:
        tensors = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} cannot be read ({e})") from None
    model = NTM(config)
    check_tensors(tensors, model.state_dict(), weights)
    model.load_state_dict(tensors)
    return model.to(device).eval()


def load_train_state(path) -> dict:
    """train_state.pt, verified against checkpoint.json (its sha256 and step) and checked for the
    entries a resume needs. The tensors' shapes are checked when they are loaded (``check_tensors``)."""
    import pickle

    import torch

    path = Path(path)
    p = path / STATE
    if not p.exists():
        raise CheckpointError(f"{path} holds no {STATE}: nothing to resume (train without --resume)")
    meta = load_info(path)
    if "train_state_sha256" not in meta:
        raise CheckpointError(f"{path / META} records no sha256 of {STATE} (written by an older ntm-edge, or "
                              f"by save_pretrained over a training run): it cannot be verified and is not resumed")
    verify_file(p, meta["train_state_sha256"])
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise CheckpointError(f"{p} is corrupt or truncated ({msg})") from None
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise CheckpointError(f"{p} lacks entries that a resume needs ({', '.join(STATE_KEYS)})")
    if state["step"] != meta.get("step"):
        raise CheckpointError(f"{p} is at step {state['step']} but {META} says {meta.get('step')}: "
                              "the two files come from different saves")
    return state
