"""ntm-edge: Normalizing Trajectory Models, few-step image generation with an exact likelihood.

Importing this package does not import torch (the runtime, ``ntm_edge.runtime``, runs without it);
``NTM`` is loaded on first use.
"""

__version__ = "0.1.0"
__all__ = ["NTM", "NTMConfig", "PRESETS", "__version__"]


def __getattr__(name):
    if name == "NTM":
        from .model import NTM

        return NTM
    if name in ("NTMConfig", "PRESETS"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'ntm_edge' has no attribute {name!r}")
