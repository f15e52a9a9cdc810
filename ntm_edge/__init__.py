"""ntm-edge: Normalizing Trajectory Models, few-step image generation with an exact likelihood.

Importing this package does not import torch (the runtime, ``ntm_edge.runtime``, runs without it);
``NTM`` and ``sample_images`` are loaded on first use.

Layout: this folder holds the core package; the repository's top-level folders export/, runtime/ and
calib/ install as its subpackages ntm_edge.export, ntm_edge.runtime and ntm_edge.calib
(pyproject.toml, [tool.setuptools.package-dir]).
"""

__version__ = "0.1.0"
__all__ = ["NTM", "NTMConfig", "PRESETS", "__version__", "sample_images"]


def __getattr__(name):
    if name == "NTM":
        from .model import NTM

        return NTM
    if name == "sample_images":
        from .exits import sample_images

        return sample_images
    if name in ("NTMConfig", "PRESETS"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'ntm_edge' has no attribute {name!r}")
