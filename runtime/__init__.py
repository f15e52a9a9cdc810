"""ntm_edge.runtime: the torch-free runtime (numpy + onnxruntime; TensorRT engines later).

Never imports torch. It loads a bundle written by ``ntm-edge export`` (bundle.py: manifest, format
version and sha256 of every file checked on load), runs its graphs on onnxruntime with the chosen
execution provider (session.py), and implements on them the four-step sampler with classifier-free
guidance (sampler.py), the exact transporter inversion, Jacobi or sequential (inversion.py), and
the likelihood audit (audit.py). app.py holds what `ntm-edge run` and `ntm-edge audit` do.
"""

from .bundle import Bundle, BundleError, load_bundle
from .session import Runtime, open_runtime

__all__ = ["Bundle", "BundleError", "Runtime", "load_bundle", "open_runtime"]
