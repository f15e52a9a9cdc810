"""The default model that ships inside the package (torch-free: the runtime reads it too).

    ntm_edge/assets/default/assets.json     format, the sha256 of every file below, what the runtime adds
                                            on first use, provenance; sealed (``fileio.seal``)
    ntm_edge/assets/default/MODEL_CARD.md   how the model was trained and how well it does (not hashed)
    ntm_edge/assets/default/checkpoint/     config.json, model.safetensors, checkpoint.json and the
                                            denoiser (denoiser.safetensors, denoiser.json): what
                                            ``NTM.from_pretrained("default")`` loads
    ntm_edge/assets/default/bundle/         its ONNX export (manifest.json + graphs), less the files that
                                            do not depend on the model: a text model's MiniLM prompt-encoder
                                            graph (~90 MB) and tokenizer.json, which ``ntm-edge run`` adds
                                            when it assembles the full bundle in the cache on first use
                                            (runtime/default_model.py). The graphs keep their large weights
                                            in one external-data file, weights.bin, each distinct tensor
                                            once (the exported graphs repeat the predictor and the
                                            transporter blocks: this halves the bundle)

Every file is checked against its recorded sha256 whenever the default model is used, and
assets.json against its own seal: a modified or damaged installation is refused in one line. The
content hash of assets.json (``asset_key``) names the assembled bundle in the cache, so a new default
model never reuses an old bundle. ``python -m ntm_edge.assets.build`` writes this directory from a
trained checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import NtmError
from ..fileio import SEAL, is_sealed, read_json_object, sha256_file

DEFAULT = "default"  # NTM.from_pretrained("default"), load_denoiser("default"): the shipped model
ROOT = Path(__file__).parent / DEFAULT
INDEX = "assets.json"
MODEL_CARD = "MODEL_CARD.md"
CHECKPOINT, BUNDLE = "checkpoint", "bundle"
FORMAT = "ntm-edge-default-model"
FORMAT_VERSION = 1
_REMEDY = "reinstall ntm-edge (pip install --force-reinstall ntm-edge), or rebuild it with python -m ntm_edge.assets.build"


class AssetError(NtmError):
    """The shipped default model is missing, modified or damaged."""


def is_default(path) -> bool:
    """Whether ``path`` names the shipped model: the string "default" (a ``Path("default")`` is a directory)."""
    return isinstance(path, str) and path == DEFAULT


def is_asset_dir(root: Path) -> bool:
    """Whether ``root`` holds an assets.json of this format (any version): a directory the build may replace."""
    try:
        return read_json_object(Path(root) / INDEX).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def root_dir(root=None) -> Path:
    """``root``, or the shipped default-model directory (``ROOT``, looked up at call time)."""
    return Path(root) if root is not None else ROOT


def read_index(root=None) -> dict:
    """assets.json of ``root`` (default: the shipped one), checked: its format, version and seal (not yet
    the files it lists)."""
    path = root_dir(root) / INDEX
    if not path.is_file():
        raise AssetError(f"the default model is not installed: {path} is missing; {_REMEDY}")
    try:
        index = read_json_object(path)
    except (OSError, ValueError) as e:
        raise AssetError(f"{path} cannot be read ({e}); {_REMEDY}") from None
    if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
        raise AssetError(f"{path} is not a default-model index of format {FORMAT!r} version {FORMAT_VERSION}; {_REMEDY}")
    if not is_sealed(index) or not isinstance(index.get("files"), dict) or not index["files"]:
        raise AssetError(f"{path} does not match its recorded sha256 (edited or damaged); {_REMEDY}")
    return index


def verify(root=None) -> dict:
    """assets.json (``read_index``) and every file it lists against its recorded sha256 -> the index."""
    root = root_dir(root)
    index = read_index(root)
    for name, digest in index["files"].items():
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise AssetError(f"{root / INDEX} lists a file outside its directory ({name!r}); {_REMEDY}")
        if not path.is_file():
            raise AssetError(f"the default model is incomplete: {path} is missing; {_REMEDY}")
        if sha256_file(path) != digest:
            raise AssetError(f"the default model's {name} does not match its recorded sha256 (modified or damaged); "
                             f"{_REMEDY}")
    return index


def asset_key(index: dict) -> str:
    """The content hash of a (sealed) assets.json: it covers the sha256 of every shipped file."""
    return index[SEAL]


def checkpoint_dir(root=None) -> Path:
    """The shipped checkpoint directory, after every shipped file has been checked (``verify``)."""
    verify(root)
    return root_dir(root) / CHECKPOINT


def resolve_checkpoint(path):
    """``path`` itself, or the verified shipped checkpoint directory when it is "default"."""
    return checkpoint_dir() if is_default(path) else path
