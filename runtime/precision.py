"""Which precision a run uses: the one asked for, or the best that the bundle holds and the provider
runs well. numpy-free, torch-free.

Preference per provider, best first (a precision the bundle lacks, or that failed the export's quality
gate and was only kept by --force, is skipped):

    tensorrt (native engines)       int8 > fp16 > fp32
    cuda (onnxruntime)              fp16 > fp32            (its Q/DQ kernels mostly dequantize)
    cpu                             int8 if the CPU has an 8-bit dot-product instruction (x86 VNNI, Arm dotprod),
                                    fp16 on Arm CPUs with FP16 arithmetic (onnxruntime has fp16 CPU kernels there), else fp32

On a CPU without fast fp16, onnxruntime runs an fp16 graph through casts to fp32 kernels: slower
than fp32 and no more accurate, so fp32 comes first there.
"""

from __future__ import annotations

from pathlib import Path

from .bundle import Bundle, BundleError

PRECISIONS = ("fp32", "fp16", "int8")


def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (Linux); empty where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def preference(provider: str, flags: set[str] | None = None) -> list[str]:
    """Precisions in the order a provider short name ("tensorrt", "cuda", "cpu") runs them best."""
    if provider == "tensorrt":
        return ["int8", "fp16", "fp32"]
    if provider == "cuda":
        return ["fp16", "fp32"]
    flags = cpu_flags() if flags is None else flags
    order = []
    if flags & {"avx512_vnni", "avx_vnni", "asimddp"}:
        order.append("int8")
    if flags & {"asimdhp"}:  # onnxruntime's CPU provider has fp16 kernels on Arm; on x86 it casts to fp32
        order.append("fp16")
    return order + ["fp32"]


def held(bundle: Bundle) -> list[str]:
    """Precisions every graph of the bundle has a file for."""
    return [p for p in PRECISIONS if all(p in e.get("variants", {}) for e in bundle.manifest["graphs"].values())]


def gate_verdicts(bundle: Bundle) -> dict[str, str]:
    """Quality-gate verdict per precision recorded at export ("pass", "forced: ...", "reference")."""
    rows = ((bundle.manifest.get("precision") or {}).get("quality") or {}).get("rows", [])
    return {r["precision"]: r["verdict"] for r in rows}


def choose_precision(bundle: Bundle, provider: str, requested: str | None = None) -> str:
    """The precision to run: ``requested`` if the bundle has it, else the provider's best that the bundle
    holds and whose quality gate passed."""
    have = held(bundle)
    if requested not in (None, "", "auto"):
        if requested not in PRECISIONS:
            raise BundleError(f"unknown precision {requested!r}; choose one of: auto, {', '.join(PRECISIONS)}")
        if requested not in have:
            raise BundleError(f"bundle {bundle.root} has no {requested} graphs (it holds {', '.join(have)}); "
                              f"re-export it with --{requested}")
        return requested
    verdicts = gate_verdicts(bundle)
    for p in preference(provider):
        if p in have and verdicts.get(p, "pass") in ("pass", "reference"):
            return p
    return "fp32"


def describe(bundle: Bundle, precision: str) -> str:
    """One line: the precision and what each graph runs in."""
    runs = {name: e["variants"][precision].get("runs", precision) for name, e in bundle.manifest["graphs"].items()}
    groups: dict[str, list[str]] = {}
    for name, p in runs.items():
        groups.setdefault(p, []).append(name)
    return f"precision {precision}: " + "; ".join(f"{p}: {', '.join(names)}" for p, names in groups.items())
