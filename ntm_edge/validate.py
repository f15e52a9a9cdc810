"""Checks of the values a user passes on the command line, in one place for every command.

Each function takes a value as given, and returns the value to use or raises ``ConfigError`` with one
sentence that names the option and the reason. Commands call them before any work starts, so a bad
value never costs a long run and never leaves a partial output. A value that can be used but not as
given (more threads than cores) is adjusted, and the adjustment is reported through ``warn``.

This module imports neither torch nor numpy at import time (the CLI and the runtime import it);
``torch_device`` imports torch when it is called, and ``max_steps`` imports the numpy schedule.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError

Warn = Callable[[str], object]

# the image formats an output path may name, by suffix (Pillow's format names)
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}
ARRAY_SUFFIX = ".npy"
DEVICES = "cpu, cuda, cuda:N"
SEED_LIMIT = 2**63  # seeds are int64 for torch and numpy alike


def _ignore(_: str) -> None:
    return None


def flush(notes: list[str], warn: Warn | None = None, log=print) -> None:
    """Issue the warnings collected while checking, once every check has passed (so that an error is
    always the only line a refused command prints). ``warn`` None: a ``warning:`` line through ``log``."""
    for note in notes:
        if warn is None:
            log(f"warning: {note}")
        else:
            warn(note)


# -------------------------------------------------------------------------------------------------
# numbers
# -------------------------------------------------------------------------------------------------


def count(value: int, option: str, minimum: int = 1) -> int:
    """An integer count (``--num``, ``--batch``, ``--trajectories``) of at least ``minimum``."""
    if value < minimum:
        raise ConfigError(f"{option} must be at least {minimum}, got {value}")
    return value


def whole_numbers(text: str, option: str) -> tuple[int, ...] | None:
    """A comma-separated list of whole numbers ('4,8,16') -> (4, 8, 16); '' -> None (not given)."""
    if not text.strip():
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} takes whole numbers separated by commas (like 4,8,16), got {text!r}") from None


def finite_nonnegative(value: float, option: str) -> float:
    """A finite number >= 0 (NaN or inf in a sampler option would give black images), as a float."""
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{option} must be a finite number >= 0, got {value}")
    return float(value)


def guidance(value: float, option: str = "--guidance") -> float:
    """The classifier-free guidance weight w: finite and >= 0."""
    return finite_nonnegative(value, option)


def temperature(value: float, option: str = "--temperature") -> float:
    """The sampler's noise temperature tau: finite and >= 0 (0: every draw zero, the chain of means)."""
    return finite_nonnegative(value, option)


def learning_rate(value: float, option: str = "--lr") -> float:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{option} must be a finite number > 0, got {value}")
    return float(value)


def seed(value: int, option: str = "--seed") -> int:
    if not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{option} must lie in [0, 2^63), got {value}")
    return value


def max_steps(t_min: float, shift: float = 0.0) -> int:
    """The largest step count T whose time grid keeps t_0 = t_min below its first level.

    The levels are t_k = shift(k / T) with t_T = 1 (``schedule.time_grid``); the grid needs
    t_min < t_1 = shift(1 / T). The shift is increasing, so this holds for 1 / T > shift^-1(t_min),
    i.e. T < 1 / shift^-1(t_min), where shift^-1(y) = y / (e^mu - (e^mu - 1) y). Unshifted
    (mu = 0) it is T < 1 / t_min: at the sampler's t_min = 0.025, T <= 39.
    """
    from . import schedule

    if not 0 < t_min < 1:
        raise ValueError(f"t_min must lie in (0, 1), got {t_min}")
    e = math.exp(shift)
    limit = math.floor((e - (e - 1.0) * t_min) / t_min)  # 1 / shift^-1(t_min)

    def fits(T: int) -> bool:  # exactly the check of schedule.time_grid
        return t_min < float(schedule.shift_time(1.0 / T, shift))

    while limit >= 1 and not fits(limit):  # float rounding at the edge
        limit -= 1
    while fits(limit + 1):
        limit += 1
    return limit


def steps(value: int, t_min: float, shift: float = 0.0, option: str = "--steps") -> int:
    """A coarse step count T that the schedule supports for the lowest level ``t_min`` (see ``max_steps``)."""
    count(value, option)
    limit = max_steps(t_min, shift)
    if value > limit:
        raise ConfigError(f"{option} {value} is past what the schedule supports: the first level t_1 = 1/T "
                          f"(shifted by {shift:g}) must stay above t_0 = {t_min:g}, so T <= {limit}")
    return value


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads(value: int | None, option: str = "--threads", warn: Warn = _ignore) -> int | None:
    """CPU threads per graph: None (not given: $OMP_NUM_THREADS, else onnxruntime's choice), 0
    (onnxruntime's choice: one thread per physical core), -1 (every core this process may use), or N
    (bounded by that core count, with a warning). Returns None, 0 or a thread count >= 1."""
    if value is None or value == 0:
        return value
    cores = cpu_count()
    if value == -1:
        return cores
    if value < -1:
        raise ConfigError(f"{option} must be -1 (all cores), 0 (onnxruntime's choice) or a thread count, got {value}")
    if value > cores:
        warn(f"{option} {value} is more than the {cores} cores this process may use; using {cores}")
        return cores
    return value


def fits_in_memory(nbytes: float, what: str) -> None:
    """Refuse work whose arrays alone would not fit in the memory available now."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise ConfigError(f"{what} needs at least {_size(nbytes)} of memory; {_size(available)} is available")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable on Linux), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} PiB"  # pragma: no cover


def opset(value: int, lowest: int, highest: int, option: str = "--opset") -> int:
    """An ONNX opset within [lowest, highest]: what both the installed exporter and onnx support."""
    if not lowest <= value <= highest:
        raise ConfigError(f"{option} must lie in [{lowest}, {highest}] (what this torch exporter and onnx "
                          f"support), got {value}")
    return value


def choice(value: str, choices, option: str) -> str:
    if value not in choices:
        raise ConfigError(f"unknown {option} {value!r}; choose one of: {', '.join(choices)}")
    return value


# -------------------------------------------------------------------------------------------------
# devices
# -------------------------------------------------------------------------------------------------


def device(value: str, cuda_devices: int | None = None, option: str = "--device") -> str:
    """A torch device: cpu, cuda or cuda:N. ``cuda_devices`` (how many CUDA devices torch sees; None:
    unknown) turns a device this machine lacks into one line instead of a traceback from torch."""
    name = value.strip().lower()
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (kind == "cpu" and index) or (index and not index.isdigit()):
        raise ConfigError(f"unknown {option} {value!r}; choose one of: {DEVICES}")
    if kind == "cuda" and cuda_devices is not None:
        if cuda_devices == 0:
            raise ConfigError(f"{option} {value}: this torch sees no CUDA device (a CPU build or no GPU); use --device cpu")
        if index and int(index) >= cuda_devices:
            raise ConfigError(f"{option} {value}: this machine has {cuda_devices} CUDA device(s), cuda:0 to "
                              f"cuda:{cuda_devices - 1}")
    return name


def torch_device(value: str, option: str = "--device") -> str:
    """``device`` checked against what torch sees on this machine (imports torch)."""
    device(value, option=option)  # the spelling first, before torch is imported
    import torch

    return device(value, torch.cuda.device_count() if torch.cuda.is_available() else 0, option)


# -------------------------------------------------------------------------------------------------
# output paths
# -------------------------------------------------------------------------------------------------


def output_file(path, option: str, suffixes: tuple[str, ...] | None = None, what: str = "") -> Path:
    """A file the command will write: not a directory, under a directory that exists or can be made
    and is writable, and (with ``suffixes``) ending in one of them. Checked before any work."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a directory; give a file name")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ConfigError(f"{option} {path} must end in {', '.join(suffixes)}{f' ({what})' if what else ''}")
    writable_parent(path, option)
    return path


def writable_parent(path, option: str) -> Path:
    """The directory that will hold ``path``: it exists (or can be created) and this process may write
    there (``fileio.output_dir_problem``: a temporary is created and removed, so /proc, /sys or a
    read-only mount that access() calls writable are refused too)."""
    from .fileio import output_dir_problem

    path = Path(path)
    parent = path.absolute().parent
    problem = output_dir_problem(parent)
    if problem:
        raise ConfigError(f"{option} {path}: {problem}")
    return parent


def image_path(path, option: str = "--out") -> Path:
    """An image to write: the suffix names the format (``IMAGE_FORMATS``)."""
    return output_file(path, option, tuple(IMAGE_FORMATS), "the suffix names the image format")


def image_format(path) -> str:
    """Pillow's name of the format that ``path``'s suffix names."""
    return IMAGE_FORMATS[Path(path).suffix.lower()]


def array_path(path, option: str = "--save-array") -> Path:
    return output_file(path, option, (ARRAY_SUFFIX,), "a numpy array")


# -------------------------------------------------------------------------------------------------
# the exit from u-space and the step count the denoiser was trained for
# -------------------------------------------------------------------------------------------------


def steps_in_training(steps: int, trained, warn: Warn = _ignore) -> None:
    """Warn when ``steps`` is not a step count the model was trained at (``trained``: the checkpoint's or
    bundle's record; None: any T, as for flow matching, or not recorded). Not refused: a model may be judged
    off its training grid on purpose, but a user should know why its images got worse (measured on the
    README's model trained on the 4-step grid alone, at --steps 8: 7.21 bits/dim and Frechet 5.48, against 4.43
    and 2.00 for the same recipe trained on {4, 8, 16})."""
    if trained and steps not in trained:
        shown = ", ".join(map(str, trained))
        warn(f"this model was trained at --steps {shown} only; at --steps {steps} it runs on a grid it never saw, and its "
             f"images and bits/dim can be much worse (train with {steps} among the step counts to use it)")


def exit_for_steps(final: str | None, steps: int, denoiser_steps: int | None, warn: Warn = _ignore) -> str:
    """The exit from u-space for ``--final`` (None: the default) at ``--steps``.

    The learned denoiser reads u_t0 of trajectories with the T it was trained for
    (``denoiser_steps``; None: no denoiser). Asked for explicitly at another T, it is refused: its
    input would be out of distribution and its images silently wrong. As the default, it gives way
    to the exact inverse at another T, with a warning.
    """
    if final is None:
        if denoiser_steps is None:
            return "inverse"
        if steps == denoiser_steps:
            return "denoiser"
        warn(f"the denoiser was trained for --steps {denoiser_steps}; at --steps {steps} the images leave u-space "
             f"by the exact inverse instead (--final inverse)")
        return "inverse"
    if final == "denoiser" and denoiser_steps is not None and steps != denoiser_steps:
        raise ConfigError(f"the denoiser was trained for --steps {denoiser_steps}, not {steps}: its input would be "
                          f"out of distribution; use --steps {denoiser_steps}, or --final inverse")
    return final
