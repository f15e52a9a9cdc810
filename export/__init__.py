"""ntm_edge.export: checkpoint -> ONNX bundle (one pure function per graph, IO specs as data).

``export_bundle(checkpoint, out)`` writes ``out/manifest.json`` and one ONNX file per graph
(export/writer.py); the graph modules are in export/graphs.py, the parity checks in export/parity.py.
The IO specs live in ``ntm_edge.runtime.specs`` (torch-free), which the runtime reads too.
This package needs torch; importing it does not (the names below load on first use).

Layout: this is the repository's top-level `export/` folder, installed as `ntm_edge.export` by
pyproject.toml ([tool.setuptools.package-dir]); there is no `ntm_edge/export/` folder. Its modules
import the core package absolutely (`from ntm_edge import schedule`) and each other relatively
(`from .graphs import ...`). `make typecheck` checks the tree laid out as installed.
"""

__all__ = ["ExportError", "export_bundle"]


def __getattr__(name):
    if name in __all__:
        from . import writer

        return getattr(writer, name)
    raise AttributeError(f"module 'ntm_edge.export' has no attribute {name!r}")
