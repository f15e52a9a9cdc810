"""ntm_edge.runtime: the torch-free runtime (numpy + onnxruntime; TensorRT engines later).

Never imports torch. It loads a bundle written by ``ntm-edge export`` (bundle.py: manifest, format
version and sha256 of every file checked on load), runs its graphs on onnxruntime with the chosen
execution provider (session.py), and implements on them the four-step sampler with classifier-free
guidance (sampler.py), the exact transporter inversion, (GS-)Jacobi or sequential (inversion.py), and
the likelihood audit (audit.py). app.py holds what `ntm-edge run` and `ntm-edge audit` do. The
algorithm itself is not written here: the loops and formulas are ``ntm_edge.sampling``,
``ntm_edge.decoding``, ``ntm_edge.numerics`` and ``ntm_edge.schedule`` (torch-free), shared with
the torch model; the runtime supplies the bundle's graphs as the networks.

Layout: this is the repository's top-level `runtime/` folder, installed as `ntm_edge.runtime` by
pyproject.toml ([tool.setuptools.package-dir]); there is no `ntm_edge/runtime/` folder. Its modules
import the core package absolutely (`from ntm_edge import schedule`) and each other relatively
(`from .session import ...`). `make typecheck` checks the tree laid out as installed.
"""

from .bundle import Bundle, BundleError, load_bundle
from .session import Runtime, open_runtime

__all__ = ["Bundle", "BundleError", "Runtime", "load_bundle", "open_runtime"]
