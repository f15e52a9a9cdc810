"""Build the shipped default model from a trained checkpoint (needs torch and the export extra).

    python -m ntm_edge.assets.build --checkpoint runs/X --out ntm_edge/assets/default [--placeholder]

1. Refuse, before any work, an ``--out`` that holds anything but an earlier default-model directory of
   our own (its assets.json, the files that lists and MODEL_CARD.md), or that overlaps the checkpoint.
2. Load the checkpoint (and its denoiser) as ``NTM.from_pretrained`` does: every hash checked.
3. Export it with ``ntm_edge.export.export_bundle`` (fp32, parity against torch) into a scratch directory.
4. Stage the new directory next to ``--out``: the checkpoint's config, weights and records (not its
   train_state.pt: optimizer state is not shipped), the denoiser, and the bundle less the files the
   runtime adds back on first use (a text model's MiniLM prompt-encoder graph and tokenizer.json:
   model-independent, ~90 MB). The graphs' large initializers move to one external-data file that
   stores each distinct tensor once (``share_initializers``: the exported graphs repeat the predictor
   and the transporter blocks). The bundle's manifest lists the files as shipped and is sealed again.
5. Write assets.json (sha256 of every file, what the runtime adds, provenance), keep the earlier
   MODEL_CARD.md (or write the template: where there was none, or where a real model replaces a
   ``--placeholder`` one), and rename the directory into place (``fileio.publish_dir``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from ntm_edge import assets
from ntm_edge.checkpoint import CONFIG, META, WEIGHTS, load_info
from ntm_edge.errors import ConfigError, NtmError, exit_status
from ntm_edge.fileio import atomic_write_text, make_temp_dir, publish_dir, remove_stale_temporaries, seal, sha256_file
from ntm_edge.runtime.bundle import MANIFEST, TOKENIZER, read_manifest
from ntm_edge.runtime.bundle import seal as seal_manifest
from ntm_edge.runtime.default_model import TEXT_GRAPH

CHECKPOINT_FILES = (CONFIG, WEIGHTS, META)
DENOISER_FILES = ("denoiser.safetensors", "denoiser.json")
TEMPLATE = Path(__file__).parent / "MODEL_CARD.template.md"


def owned_files(out: Path) -> set[str]:
    """What an earlier build in ``out`` accounts for: assets.json, every file it lists, the model card."""
    try:
        listed = set(assets.read_index(out)["files"])
    except NtmError:
        listed = set()
    return {assets.INDEX, assets.MODEL_CARD} | listed


def check_out(out: Path, checkpoint: Path) -> None:
    """``out`` is absent, empty, or an earlier default-model directory holding nothing else."""
    target, source = out.resolve(), checkpoint.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise ConfigError(f"--out {out} and --checkpoint {checkpoint} overlap; choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not assets.is_asset_dir(out):
            raise ConfigError(f"{out} exists and is not a default-model directory (no {assets.INDEX} of format "
                              f"{assets.FORMAT!r}); only such a directory is replaced: choose another --out")
        owned = owned_files(out)
        foreign = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
                         and str(p.relative_to(out)) not in owned)
        if foreign:
            raise ConfigError(f"{out} holds {len(foreign)} file(s) that no earlier build wrote (e.g. {foreign[0]!r}); "
                              f"move them or choose another --out")


def check_export(bundle: Path, checkpoint: Path) -> None:
    """``bundle`` is a whole fp32 export of exactly this checkpoint's weights (and denoiser, if it has one)."""
    from ntm_edge.runtime.bundle import load_bundle

    source = load_bundle(bundle).manifest.get("source", {})
    if source.get("weights_sha256") != load_info(checkpoint).get("weights_sha256"):
        raise ConfigError(f"--bundle {bundle} was exported from other weights than --checkpoint {checkpoint}")
    den, den_file = source.get("denoiser_sha256"), checkpoint / DENOISER_FILES[0]
    if den is not None and (not den_file.is_file() or den != sha256_file(den_file)):
        raise ConfigError(f"--bundle {bundle} holds a denoiser that --checkpoint {checkpoint} does not hold")


def build(checkpoint, out, batch: int = 8, placeholder: bool = False, bundle=None, log=print) -> dict:
    """Write the default-model directory ``out`` from ``checkpoint``; returns its assets.json. ``bundle``:
    an existing export of the checkpoint to ship (checked: same weights) instead of exporting it again."""
    from ntm_edge.denoiser import has_denoiser, load_denoiser
    from ntm_edge.export import export_bundle
    from ntm_edge.model import NTM

    checkpoint, out = Path(checkpoint), Path(out)
    check_out(out, checkpoint)
    model = NTM.from_pretrained(checkpoint)  # every file checked against checkpoint.json
    denoiser = has_denoiser(checkpoint)
    if denoiser:
        load_denoiser(checkpoint)  # checked, and trained for these weights
    else:
        log(f"note: {checkpoint} has no denoiser; the default model will exit by inversion only")
    text = model.config.prompt.kind != "label"
    remove_stale_temporaries(out.parent, out.name)
    with tempfile.TemporaryDirectory(prefix="ntm-edge-default-") as scratch:
        if bundle is not None:
            exported = Path(bundle)
            check_export(exported, checkpoint)
        else:
            exported = Path(scratch) / "bundle"
            export_bundle(checkpoint, exported, batch=batch, log=log)
        tmp = make_temp_dir(out.parent, out.name)
        try:
            index = _stage(checkpoint, exported, tmp, denoiser, text, placeholder)
            shutil.copyfile(_card_to_keep(out, placeholder) or TEMPLATE, tmp / assets.MODEL_CARD)
            publish_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    sizes = {name: (out / name).stat().st_size for name in index["files"]}
    for name, size in sizes.items():
        log(f"  {name:45s} {size / 2**20:8.2f} MiB")
    log(f"wrote {out}: {len(sizes)} files, {sum(sizes.values()) / 2**20:.2f} MiB"
        + (" (marked as a placeholder)" if placeholder else ""))
    return index


SHARED_WEIGHTS = "weights.bin"  # the bundle's graphs' large initializers, each distinct tensor stored once
MIN_SHARED_BYTES = 1024  # smaller initializers stay inside their graph


def share_initializers(bundle_dir: Path, graphs: list[str]) -> int:
    """Move the large initializers of ``graphs`` (files in ``bundle_dir``) into one ONNX external-data file,
    SHARED_WEIGHTS, storing each distinct tensor (by content) once -> bytes saved.

    The exported graphs repeat weights: ``predictor_step`` and the unrolled ``sampler_loop`` both hold the
    whole predictor, and each transporter block sits in ``transporter_forward``, its Jacobi graph and its
    sequential-step graph. onnxruntime reads external data relative to the graph file, so the bundle
    works as before; the manifest lists SHARED_WEIGHTS with its sha256 like every other file."""
    import hashlib

    import onnx

    blob = bytearray()
    where: dict[str, int] = {}  # sha256 of a tensor's bytes -> its offset in the blob
    before = 0
    for name in graphs:
        path = bundle_dir / name
        before += path.stat().st_size
        model = onnx.load(str(path))
        for init in model.graph.initializer:
            raw = init.raw_data
            if len(raw) < MIN_SHARED_BYTES:
                continue
            key = hashlib.sha256(raw).hexdigest()
            if key not in where:
                blob.extend(b"\0" * (-len(blob) % 64))  # 64-byte aligned, for memory-mapped reads
                where[key] = len(blob)
                blob.extend(raw)
            onnx.external_data_helper.set_external_data(init, SHARED_WEIGHTS, offset=where[key], length=len(raw))
            init.ClearField("raw_data")
        onnx.save(model, str(path))
    (bundle_dir / SHARED_WEIGHTS).write_bytes(bytes(blob))
    for name in graphs:  # each graph still passes the full check, its weights read from the shared file
        onnx.checker.check_model(str(bundle_dir / name), full_check=True)
    after = sum((bundle_dir / name).stat().st_size for name in graphs) + len(blob)
    return before - after


def _card_to_keep(out: Path, placeholder: bool) -> Path | None:
    """The earlier MODEL_CARD.md in ``out`` to keep, or None for the template: a real model replacing a
    placeholder starts from the template (the placeholder's card describes the stand-in)."""
    card = out / assets.MODEL_CARD
    if not card.is_file():
        return None
    try:
        was_placeholder = bool(assets.read_index(out).get("placeholder"))
    except NtmError:
        was_placeholder = False
    return None if was_placeholder and not placeholder else card


def _stage(checkpoint: Path, exported: Path, tmp: Path, denoiser: bool, text: bool, placeholder: bool) -> dict:
    """Copy the shipped files into ``tmp`` and write its assets.json -> the index."""
    ckpt_dir, bundle_dir = tmp / assets.CHECKPOINT, tmp / assets.BUNDLE
    ckpt_dir.mkdir()
    bundle_dir.mkdir()
    for name in CHECKPOINT_FILES + (DENOISER_FILES if denoiser else ()):
        shutil.copyfile(checkpoint / name, ckpt_dir / name)
    manifest = read_manifest(exported)
    added = {TEXT_GRAPH: None, TOKENIZER: manifest["files"][TOKENIZER]} if text else {}
    for name in manifest["files"]:
        if name not in added:
            shutil.copyfile(exported / name, bundle_dir / name)
    graphs = [k for k in manifest["files"] if k.endswith(".onnx") and k not in added]
    saved = share_initializers(bundle_dir, graphs)
    kept = [k for k in manifest["files"] if k not in added] + [SHARED_WEIGHTS]
    manifest["files"] = {k: sha256_file(bundle_dir / k) for k in kept}
    manifest["shared_weights"] = {"file": SHARED_WEIGHTS, "graphs": graphs, "bytes_saved": saved}
    manifest["source"] = {**manifest["source"], "checkpoint": "ntm_edge/assets/default/checkpoint"}
    atomic_write_text(bundle_dir / MANIFEST, json.dumps(seal_manifest(manifest), indent=2))
    files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    info = load_info(checkpoint)
    index = seal({"format": assets.FORMAT, "format_version": assets.FORMAT_VERSION, "placeholder": placeholder,
                  "source": {"step": info.get("step"), "dataset": info.get("dataset"),
                             "weights_sha256": info.get("weights_sha256"), "prompt": manifest["config"]["prompt"]["kind"],
                             "bundle_key": manifest["key"]},
                  "files": files, "assemble": added})
    atomic_write_text(tmp / assets.INDEX, json.dumps(index, indent=2))
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ntm_edge.assets.build", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="trained checkpoint directory (with its denoiser)")
    parser.add_argument("--out", type=Path, required=True, help="default-model directory to write (ntm_edge/assets/default)")
    parser.add_argument("--batch", type=int, default=8, help="images per graph call of the bundle")
    parser.add_argument("--placeholder", action="store_true", help="mark the model as a stand-in (assets.json)")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="ship this fp32 export of --checkpoint (checked) instead of exporting it again")
    args = parser.parse_args(argv)
    return exit_status(lambda: build(args.checkpoint, args.out, batch=args.batch, placeholder=args.placeholder,
                                     bundle=args.bundle))


if __name__ == "__main__":
    sys.exit(main())
