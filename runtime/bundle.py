"""An exported bundle on disk: ``manifest.json`` plus one ``.onnx`` file per graph and precision.

    BUNDLE/manifest.json                    format version, model config, schedule, prompt vocabulary,
                                            graphs with their IO specs, opset, versions, parity figures,
                                            sha256 of every other file
    BUNDLE/<graph>.<precision>.onnx         e.g. predictor_step.fp32.onnx
    BUNDLE/tokenizer.json                   a text model's tokenizer (listed with its sha256 like the rest;
                                            the manifest's ``prompts.encoder_sha256`` names the encoder weights)

A graph entry holds its IO spec once and a ``variants`` map, precision -> file, so FP16 and INT8
builds of the same graph join the bundle without changing its layout.

Loading checks, in order, each failure one ``BundleError`` sentence:

1. the format and its version;
2. the manifest's own content: ``content_sha256`` is the sha256 of the manifest without that field
   (canonical JSON, ``content_digest``), so an edited value (``transporter.num_blocks``) is refused;
3. the values: the config, and every field the runtime reads (batch, transporter layout, prompts,
   schedule, denoiser) against what the config implies, and every graph's IO spec against the specs
   the config gives (``specs.graph_specs``), naming the first mismatch;
4. the sha256 of every listed file (the ``.onnx`` graphs; ``session.Graph`` then checks each loaded
   graph's inputs and outputs against its spec).

Whoever writes or changes a manifest calls ``seal`` last. The exporter (``ntm_edge.export``) writes
bundles; this module only reads them (numpy-free, torch-free). ``is_bundle`` tells the exporter's
``--overwrite`` whether a directory is one of ours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ntm_edge.config import NTMConfig
from ntm_edge.errors import ConfigError, NtmError
from ntm_edge.fileio import canonical_sha256, read_json_object, sha256_file
from ntm_edge.prompts import NULL_ID, LabelVocab, TextVocab, make_vocab

from .specs import DENOISER, GraphSpec, graph_specs

FORMAT = "ntm-edge-bundle"
FORMAT_VERSION = 2  # 2: the manifest carries the sha256 of its own content
MANIFEST = "manifest.json"
CONTENT_KEY = "content_sha256"
TOKENIZER = "tokenizer.json"
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
    def vocab(self) -> LabelVocab | TextVocab:
        """The prompt vocabulary: the label table, or the tokenizer.json that a text bundle carries."""
        return make_vocab(self.config.prompt, self.root / TOKENIZER)

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


def prompts_entry(config: NTMConfig) -> dict:
    """The manifest's ``prompts`` entry as the config implies it (a text bundle adds ``encoder_sha256``)."""
    p = config.prompt
    if p.kind == "label":
        return {"kind": p.kind, "class_names": list(p.class_names), "num_tokens": len(p.class_names) + 1,
                "null_id": NULL_ID, "prefix_tokens": 1}
    return {"kind": p.kind, "class_names": list(p.class_names), "max_tokens": p.max_tokens,
            "prefix_tokens": p.max_tokens, "tokenizer": TOKENIZER}


def content_digest(manifest: dict) -> str:
    """sha256 of the manifest without its ``content_sha256`` field, as canonical JSON (sorted keys)."""
    return canonical_sha256({k: v for k, v in manifest.items() if k != CONTENT_KEY})


def seal(manifest: dict) -> dict:
    """Record the manifest's content hash in it (the last change before it is written)."""
    manifest[CONTENT_KEY] = content_digest(manifest)
    return manifest


def is_bundle(root: Path) -> bool:
    """Whether ``root`` is a directory whose manifest says it is an ntm-edge bundle (any version)."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


ENGINE_DIR = "engines"  # TensorRT engines and their index, written into a bundle by `ntm-edge build-engines`


def owned_files(root: Path) -> set[str]:
    """The names in a bundle directory that the bundle accounts for: the manifest, every file it lists,
    and the engine folder that `ntm-edge build-engines` writes (recognised by its engines.json index)."""
    engines = {ENGINE_DIR} if (Path(root) / ENGINE_DIR / "engines.json").is_file() else set()
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
        files = set(manifest.get("files") or {})
        for entry in (manifest.get("graphs") or {}).values():
            files |= {v.get("file") for v in entry.get("variants", {}).values()}
    except (OSError, ValueError, AttributeError, TypeError):
        return set()
    return {MANIFEST} | engines | {f for f in files if isinstance(f, str)}


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle directory {root} does not exist (write one with `ntm-edge export`)")
    if not path.exists():
        raise BundleError(f"{root} holds no {MANIFEST}: it is not an ntm-edge bundle (write one with `ntm-edge export`)")
    try:
        manifest = read_json_object(path)
    except ValueError as e:
        raise BundleError(f"{path} is corrupt ({e}); re-export the bundle") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not an ntm-edge bundle manifest (format {FORMAT!r} expected)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{root} has bundle format version {version!r}, this ntm-edge reads {FORMAT_VERSION}; "
                          f"re-export it with this version")
    if not isinstance(manifest.get(CONTENT_KEY), str):
        raise BundleError(f"{path} carries no content hash ({CONTENT_KEY}); re-export the bundle")
    if manifest[CONTENT_KEY] != content_digest(manifest):
        raise BundleError(f"{path} does not match its own content hash: it was edited or is corrupt; re-export the bundle")
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
        check_values(root, manifest, config, graphs)
    except ConfigError as e:
        raise BundleError(f"{root / MANIFEST}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError, IndexError) as e:
        raise BundleError(f"{root / MANIFEST} is incomplete or malformed ({e.__class__.__name__}: {e}); "
                          f"re-export the bundle") from None
    if verify:
        verify_files(root, manifest)
    return Bundle(root, manifest, config, graphs)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_values(root: Path, manifest: dict, config: NTMConfig, graphs: dict[str, GraphSpec]) -> None:
    """Every manifest field that the runtime reads, against the config (and its own rules): a value that
    would crash deep inside (``batch: 0``) or silently change a result is refused here, by name."""

    def refuse(field: str, got, want: str):
        raise BundleError(f"{root / MANIFEST}: {field} is {got!r}, but {want}; re-export the bundle")

    if config.objective == "fm":
        refuse("config.objective", config.objective, "a flow-matching model has no bundle")
    batch = manifest["batch"]
    if not _integer(batch) or batch < 1:
        refuse("batch", batch, "it must be an integer >= 1")
    tc, C, S = config.transporter, config.channels, config.image_size
    tr = manifest["transporter"]
    implied = {"num_blocks": tc.num_blocks, "patch_size": tc.patch_size, "num_tokens": (S // tc.patch_size) ** 2,
               "token_dim": C * tc.patch_size**2, "layers": tc.layers_per_block, "heads": tc.heads,
               "head_dim": tc.width // tc.heads}
    for key, want in implied.items():
        if tr.get(key) != want or not _integer(tr.get(key)):
            refuse(f"transporter.{key}", tr.get(key), f"the config gives {want}")
    flip = tr.get("flip")
    if not isinstance(flip, list) or len(flip) != tc.num_blocks or not all(isinstance(f, bool) for f in flip):
        refuse("transporter.flip", flip, f"it must list {tc.num_blocks} true/false values, one per block")
    prompts = manifest["prompts"]
    for key, expected in prompts_entry(config).items():
        if prompts.get(key) != expected:
            refuse(f"prompts.{key}", prompts.get(key), f"the config gives {expected!r}")
    if config.prompt.kind != "label":
        digest = prompts.get("encoder_sha256")
        if not isinstance(digest, str) or len(digest) != 64:
            refuse("prompts.encoder_sha256", digest, "a text bundle names its encoder weights by their sha256")
        if TOKENIZER not in (manifest.get("files") or {}):
            refuse("files", sorted(manifest.get("files") or {}), f"a text bundle lists {TOKENIZER} with its sha256")
    sched = manifest["schedule"]
    for key, value in (("steps", config.steps), ("shift", config.shift), ("t_min_sample", config.t_min_sample)):
        if sched.get(key) != value:
            refuse(f"schedule.{key}", sched.get(key), f"the config gives {value!r}")
    levels = sched.get("levels_t")
    if (not isinstance(levels, list) or len(levels) != config.steps + 1
            or not all(isinstance(t, float | int) and not isinstance(t, bool) for t in levels)
            or any(not a < b for a, b in zip(levels, levels[1:], strict=False)) or levels[-1] != 1):
        refuse("schedule.levels_t", levels, f"it must rise through {config.steps + 1} levels to 1")
    trained = sched.get("trained_steps")  # absent or null: any T (flow matching) or not recorded
    if trained is not None and (not isinstance(trained, list) or not trained
                                or not all(type(T) is int and T > 0 for T in trained)):
        refuse("schedule.trained_steps", trained, "it must be null or the step counts the model was trained at")
    den = manifest.get("denoiser")
    if (DENOISER in graphs) != (den is not None):
        refuse("denoiser", den, "it must be given exactly when the bundle has a denoiser graph")
    if den is not None:
        t0, steps = den.get("t0"), den.get("steps")
        if not _integer(steps) or steps < 1:
            refuse("denoiser.steps", steps, "it must be an integer >= 1")
        if not isinstance(t0, float | int) or isinstance(t0, bool) or not 0 < t0 < 1:
            refuse("denoiser.t0", t0, "it must lie in (0, 1)")
    for name, spec in graph_specs(config, batch, has_denoiser=den is not None).items():
        got = graphs.get(name)
        if got is None:
            raise BundleError(f"{root / MANIFEST} lists no graph {name!r}, which its config needs; re-export the bundle")
        if got.dims != spec.dims:
            refuse(f"graphs.{name}.dims", got.dims, f"batch {batch} and the config give {spec.dims}")
        for kind, have, need in (("inputs", got.inputs, spec.inputs), ("outputs", got.outputs, spec.outputs)):
            if [t.name for t in have] != [t.name for t in need]:
                refuse(f"graphs.{name}.{kind}", [t.name for t in have], f"the config gives {[t.name for t in need]}")
            for a, b in zip(have, need, strict=True):
                if (a.dtype, a.shape) != (b.dtype, b.shape):
                    raise BundleError(f"{root / MANIFEST}: graphs.{name}.{kind}.{a.name} is {a.dtype} {list(a.shape)}, "
                                      f"but the config gives {b.dtype} {list(b.shape)}; re-export the bundle")
