"""The quality gate at export: every precision against fp32 on identical noise, on the runtime.

Per precision: PSNR of its images against the fp32 images (same seed, same prompts, so the same
noise), the largest |delta u| over every u level the sampler drew, prompt accuracy and Frechet
distance of ``quality_samples`` images under the evaluation classifier (ntm_edge/metrics.py, the one
`ntm-edge eval` uses), and the shift of the audit's bits/dim on held-out images. One table is printed
and stored in the manifest. A precision with non-finite outputs, or whose prompt accuracy is more than
``MAX_ACCURACY_DROP`` below fp32's, is refused unless ``force``.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError, NtmError
from ..runtime.audit import image_bound
from ..runtime.bundle import Bundle, NumericsError
from ..runtime.sampler import generate
from ..runtime.session import Runtime
from .policy import MAX_ACCURACY_DROP, PrecisionOptions


class QualityGateError(NtmError):
    """A precision that fails the quality gate (and no --force)."""


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 images a against b (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def evaluate_precision(bundle: Bundle, precision: str, clf, test, prompts, labels, seed: int, audit_images: int) -> dict:
    """Samples, prompt accuracy, Frechet distance and held-out bits/dim of one precision (CPU runtime)."""
    from ..metrics import sample_quality

    rt = Runtime(bundle, provider="cpu", precision=precision)
    row: dict = {"precision": precision}
    try:
        result = generate(rt, prompts, seed=seed)
        if not np.isfinite(result.u_levels).all():
            raise NumericsError("non-finite u levels")
        row.update(sample_quality(clf, result.images, labels, test.images))
        audit_prompts = [bundle.config.prompt.class_names[k] for k in test.labels[:audit_images]]
        bits = image_bound(rt, test.images[:audit_images], audit_prompts, trajectories=1, seed=seed)["bits_per_dim"]
        row["bits_per_dim"] = float(np.mean(bits))
        row["finite"] = bool(np.isfinite(bits).all())
        row["_images"], row["_u"] = result.images, result.u_levels
    except NumericsError:
        row["finite"] = False
    return row


def quality_gate(bundle: Bundle, checkpoint, opts: PrecisionOptions, log=print) -> dict:
    """Run the gate for fp32 and ``opts.precisions`` -> the manifest's ``quality`` entry; raises
    QualityGateError for a refused precision unless ``opts.force``."""
    from ..checkpoint import trained_on
    from ..data import load_dataset
    from ..evaluate import balanced_prompts
    from ..metrics import load_or_train_classifier

    cfg = bundle.config
    dataset = trained_on(checkpoint)
    if dataset is None:
        raise ConfigError(f"{checkpoint} does not record its dataset: the quality gate has no held-out images")
    test = load_dataset(dataset, "test", image_size=cfg.image_size, channels=cfg.channels)
    clf = load_or_train_classifier(dataset, cfg.image_size, cfg.channels, log=log)
    prompts, labels = balanced_prompts(cfg.prompt.class_names, opts.quality_samples)
    n_audit = min(opts.audit_images, len(test.images))
    rows = [evaluate_precision(bundle, p, clf, test, prompts, labels, opts.calib_seed, n_audit)
            for p in ["fp32", *opts.precisions]]
    ref = rows[0]
    if not ref["finite"]:
        raise QualityGateError("the fp32 graphs give non-finite outputs: the export itself is broken")
    arrays = [(row.pop("_images", None), row.pop("_u", None)) for row in rows]
    ref_images, ref_u = arrays[0]
    ref.update(verdict="reference", psnr_db=None, max_abs_du=0.0, accuracy_drop=0.0, bits_per_dim_shift=0.0)
    refused = []
    for row, (images, u) in zip(rows[1:], arrays[1:], strict=True):
        if not row["finite"]:
            row["verdict"] = "non-finite outputs"
        else:
            row["psnr_db"] = psnr(images, ref_images)
            row["max_abs_du"] = float(np.max(np.abs(u - ref_u)))
            row["accuracy_drop"] = ref["prompt_accuracy"] - row["prompt_accuracy"]
            row["bits_per_dim_shift"] = row["bits_per_dim"] - ref["bits_per_dim"]
            too_low = row["accuracy_drop"] > MAX_ACCURACY_DROP + 1e-12
            row["verdict"] = f"prompt accuracy drops by more than {MAX_ACCURACY_DROP}" if too_low else "pass"
        if row["verdict"] != "pass":
            refused.append(row)
            row["verdict"] = ("forced: " if opts.force else "refused: ") + row["verdict"]
    log(table(rows, opts.quality_samples, n_audit))
    report = {"samples": opts.quality_samples, "audit_images": n_audit, "seed": opts.calib_seed,
              "max_accuracy_drop": MAX_ACCURACY_DROP, "rows": rows}
    if refused and not opts.force:
        bad = refused[0]
        why = (f"its prompt accuracy is {bad['prompt_accuracy']:.3f} against {ref['prompt_accuracy']:.3f} for fp32"
               if bad.get("finite") else "its outputs are not finite")
        raise QualityGateError(f"{bad['precision']} fails the quality gate: {why}; pass --force to keep it")
    return report


def table(rows: list[dict], samples: int, audit_images: int) -> str:
    """The gate's rows as one plain-text table."""

    def fmt(v, spec):
        return "-" if v is None else (f"{v:{spec}}" if not (isinstance(v, float) and math.isinf(v)) else "inf")

    head = (f"quality gate, CPU runtime, {samples} samples per precision on identical noise "
            f"(bits/dim: {audit_images} held-out images)")
    cols = ("precision", "PSNR dB", "max |du|", "prompt acc", "Frechet", "bits/dim", "shift", "verdict")
    lines = [head, " | ".join(f"{c:>10}" for c in cols)]
    for r in rows:
        vals = (r["precision"], fmt(r.get("psnr_db"), ".1f"), fmt(r.get("max_abs_du"), ".2e"),
                fmt(r.get("prompt_accuracy"), ".3f"), fmt(r.get("frechet"), ".2f"), fmt(r.get("bits_per_dim"), ".3f"),
                fmt(r.get("bits_per_dim_shift"), "+.4f"), r["verdict"])
        lines.append(" | ".join(f"{v:>10}" for v in vals))
    return "\n".join(lines)
