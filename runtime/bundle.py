"""An exported bundle on disk: ``manifest.json`` plus one ``.onnx`` file per graph and precision.

    BUNDLE/manifest.json                    format version, model config, schedule, prompt vocabulary,
                                            graphs with their IO specs, opset, versions, parity figures,
                                            sha256 of every other file
    BUNDLE/<graph>.<precision>.onnx         e.g. predictor_step.fp32.onnx

A graph entry holds its IO spec once and a ``variants`` map, precision -> file, so FP16 and INT8
builds of the same graph join the bundle without changing its layout. Loading checks the format and
its version, then the sha256 of every listed file; any mismatch is one ``BundleError`` sentence.
The exporter (``ntm_edge.export``) writes bundles; this module only reads them (numpy-free, torch-free).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ntm_edge.config import NTMConfig
from ntm_edge.errors import ConfigError, NtmError
from ntm_edge.fileio import sha256_file
from ntm_edge.prompts import LabelVocab

from .specs import GraphSpec

FORMAT = "ntm-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")


class BundleError(NtmError):
    """A bundle directory that is missing, incomplete, modified, corrupt or of another format version."""


class NumericsError(NtmError):
    """A graph that returned NaN or inf where a finite value is needed."""


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict
    config: NTMConfig
    graphs: dict[str, GraphSpec]

    def has(self, graph: str, precision: str = "fp32") -> bool:
        return graph in self.graphs and precision in self.manifest["graphs"][graph].get("variants", {})

    def file(self, graph: str, precision: str = "fp32") -> Path:
        if not self.has(graph, precision):
            raise BundleError(f"bundle {self.root} has no {precision} graph {graph!r}; re-export it")
        return self.root / self.manifest["graphs"][graph]["variants"][precision]["file"]

    @property
    def vocab(self) -> LabelVocab:
        return LabelVocab(self.manifest["prompts"]["class_names"])

    @property
    def transporter(self) -> dict:
        """num_blocks, patch_size, num_tokens, token_dim, layers, heads, head_dim, flip (per block)."""
        return self.manifest["transporter"]

    @property
    def denoiser(self) -> dict | None:
        """{"t0", "steps"} of the learned denoiser, or None when the bundle has none."""
        return self.manifest.get("denoiser")

    @property
    def batch(self) -> int:
        """Images per graph call the bundle was built for (the opt and max of its batch axis)."""
        return int(self.manifest["batch"])


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle directory {root} does not exist (write one with `ntm-edge export`)")
    if not path.exists():
        raise BundleError(f"{root} holds no {MANIFEST}: it is not an ntm-edge bundle (write one with `ntm-edge export`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is corrupt ({e.__class__.__name__}: {e}); re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not an ntm-edge bundle manifest (format {FORMAT!r} expected)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{root} has bundle format version {version!r}, this ntm-edge reads {FORMAT_VERSION}; "
                          f"re-export it with this version")
    return manifest


def verify_files(root: Path, manifest: dict) -> None:
    """Every file the manifest lists exists and has its recorded sha256; every graph file is listed."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{root / MANIFEST} lists no files and their sha256; re-export the bundle")
    for name, digest in files.items():
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{root / MANIFEST} lists a file outside the bundle ({name!r})")
        if not path.is_file():
            raise BundleError(f"{path} is missing from the bundle; re-export it")
        if sha256_file(path) != digest:
            raise BundleError(f"{path} does not match its sha256 in {MANIFEST}: the file is corrupt or was modified; "
                              f"re-export the bundle")
    for graph, entry in manifest["graphs"].items():
        for precision, variant in entry.get("variants", {}).items():
            if variant.get("file") not in files:
                raise BundleError(f"{root / MANIFEST}: the {precision} file of graph {graph!r} has no sha256")


def load_bundle(path, verify: bool = True) -> Bundle:
    """Read and check a bundle directory -> ``Bundle``. ``verify``: check every file's sha256."""
    root = Path(path)
    manifest = read_manifest(root)
    try:
        config = NTMConfig.from_dict(manifest["config"])
        graphs = {name: GraphSpec.from_dict(name, d) for name, d in manifest["graphs"].items()}
        for key in ("prompts", "schedule", "transporter", "batch"):
            manifest[key]  # noqa: B018  (a KeyError here means an incomplete manifest)
    except ConfigError as e:
        raise BundleError(f"{root / MANIFEST}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"{root / MANIFEST} is incomplete or malformed ({e.__class__.__name__}: {e}); "
                          f"re-export the bundle") from None
    if verify:
        verify_files(root, manifest)
    return Bundle(root, manifest, config, graphs)
