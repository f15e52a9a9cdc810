"""The report of `ntm-edge bench`, from pytest-benchmark's JSON: report.md and report.png.

Per benchmark the suite records (extra_info) its stage, backend, batch, FLOPs per image (flops.py) and
the matmul probe that stands for its device's peak. From the median time this module derives:

    images/s   = batch / median
    GFLOP/s    = FLOPs per image * batch / median
    % of peak  = GFLOP/s / the probe's GFLOP/s (a square matmul timed in the same run)
    ratio      = torch eager's median / this backend's median, same stage, batch and inputs

The report leads with the ratios: they are measured side by side in one run, so machine load moves
both sides alike; the absolute figures move with the load.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .fileio import atomic_write, atomic_write_text

REFERENCE = "torch"  # the backend every ratio is taken against
CUDA_REFERENCE = "torch-cuda-eager"
GRAPH_BACKENDS = ("torch-cuda-fp32", "torch-cuda-bf16")
GOAL_MS_BATCH1, GOAL_IMAGES_PER_S = 2.0, 50_000  # issue 15, `small` on an H100/H200-class GPU


@dataclass
class Row:
    stage: str
    label: str
    order: int
    backend: str
    batch: int
    median_s: float
    min_s: float
    rounds: int
    flops_per_image: int | None
    peak: str
    info: dict = field(default_factory=dict)

    @property
    def ms(self) -> float:
        return 1e3 * self.median_s

    @property
    def images_per_s(self) -> float:
        return self.batch / self.median_s

    @property
    def gflops(self) -> float | None:
        return None if not self.flops_per_image else self.flops_per_image * self.batch / self.median_s / 1e9


def load(path: Path) -> tuple[list[Row], dict[str, float], dict[str, tuple[str, float]], dict]:
    """pytest-benchmark JSON -> (rows, peak GFLOP/s per device and dtype, probe -> (peak, GFLOP/s), machine_info).
    A peak is the best probe of its device and dtype (over libraries), each at its best round."""
    data = json.loads(Path(path).read_text())
    rows: list[Row] = []
    peaks: dict[str, float] = {}
    probes: dict[str, tuple[str, float]] = {}
    for b in data["benchmarks"]:
        info, median = dict(b["extra_info"]), b["stats"]["median"]
        if info.get("stage") == "peak":  # the best round: what the machine can do
            probes[info["probe"]] = (info["peak"], info["flops_per_call"] / b["stats"]["min"] / 1e9)
            continue
        fields = {k: info.pop(k) for k in ("stage", "stage_label", "order", "backend", "batch", "flops_per_image",
                                           "peak")}
        rows.append(Row(fields["stage"], fields["stage_label"], fields["order"], fields["backend"], fields["batch"],
                        median, b["stats"]["min"], b["stats"]["rounds"], fields["flops_per_image"], fields["peak"], info))
    rows.sort(key=lambda r: (r.order, r.batch, _backend_key(r.backend)))
    for peak, gflops in probes.values():
        peaks[peak] = max(peaks.get(peak, 0.0), gflops)
    return rows, peaks, probes, data.get("machine_info", {})


def _backend_key(name: str) -> tuple[int, str]:
    """torch eager first, then the GPU path, then onnxruntime by provider."""
    ranks = (("torch-cuda-eager", 1), ("torch-cuda", 2), ("ort-cpu", 3), ("ort-cuda", 4), ("ort-tensorrt", 5))
    rank = 0 if name == REFERENCE else next((r for prefix, r in ranks if name.startswith(prefix)), 6)
    return rank, name


def peak_fraction(row: Row, peaks: dict[str, float]) -> float | None:
    peak = peaks.get(row.peak)
    return None if row.gflops is None or not peak else row.gflops / peak


# -- Markdown --------------------------------------------------------------------------------------


def _num(x: float | None, digits: int = 3) -> str:
    """A figure with ``digits`` significant digits (no exponent for everyday magnitudes)."""
    if x is None:
        return "-"
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    places = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:,.{places}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2g}%" if x < 0.1 else f"{100 * x:.0f}%"


def ratio_table(rows: list[Row], reference: str, backends: list[str]) -> list[str]:
    """Stage x batch rows; the reference's ms, then each backend's speed ratio against it."""
    by_key = {(r.stage, r.batch, r.backend): r for r in rows}
    keys = list(dict.fromkeys((r.stage, r.label, r.batch) for r in rows))
    out = [f"| stage | batch | {reference} ms | " + " | ".join(backends) + " |",
           "|---|---:|---:|" + "---:|" * len(backends)]
    for stage, label, batch in keys:
        ref = by_key.get((stage, batch, reference))
        cells = []
        for name in backends:
            r = by_key.get((stage, batch, name))
            cells.append("-" if r is None or ref is None else f"{ref.median_s / r.median_s:.2f}x")
        if ref is None and all(c == "-" for c in cells):
            continue
        out.append(f"| {label} | {batch} | {_num(ref.ms if ref else None)} | " + " | ".join(cells) + " |")
    return out


def stage_table(rows: list[Row], peaks: dict[str, float]) -> list[str]:
    out = ["| stage | backend | batch | ms | min ms | images/s | MFLOP/image | GFLOP/s | % of peak | rounds | notes |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mflop = None if r.flops_per_image is None else r.flops_per_image / 1e6
        notes = []
        if "passes" in r.info:
            notes.append(f"passes per block {r.info['passes']}")
        if r.info.get("cuda_graph") is False:
            notes.append("not captured")
        out.append(f"| {r.label} | {r.backend} | {r.batch} | {_num(r.ms)} | {_num(1e3 * r.min_s)} | {_num(r.images_per_s)} | "
                   f"{_num(mflop)} | "
                   f"{_num(r.gflops)} | {_pct(peak_fraction(r, peaks))} | {r.rounds} | {'; '.join(notes)} |")
    return out


def goals(rows: list[Row], peaks: dict[str, float]) -> list[str]:
    """The GPU goals of issue 15 (batch 1 under 2 ms; 50,000 images/s at large batch), where the GPU path ran."""
    e2e = [r for r in rows if r.backend in GRAPH_BACKENDS and r.stage == "e2e_denoiser"]
    if not e2e:
        return []
    out = [f"## Goals on the GPU (`small`: {GOAL_MS_BATCH1:g} ms at batch 1, {GOAL_IMAGES_PER_S:,} images/s at large batch)", "",
           "| backend | batch | ms | images/s | goal | met | % of peak | ms at peak |", "|---|---:|---:|---:|---|---|---:|---:|"]
    for r in e2e:
        goal = f"< {GOAL_MS_BATCH1:g} ms" if r.batch == 1 else f">= {GOAL_IMAGES_PER_S:,} images/s" if r.batch >= 64 else "-"
        met = (r.ms < GOAL_MS_BATCH1) if r.batch == 1 else (r.images_per_s >= GOAL_IMAGES_PER_S) if r.batch >= 64 else None
        frac = peak_fraction(r, peaks)
        at_peak = None if not frac else r.ms * frac
        out.append(f"| {r.backend} | {r.batch} | {_num(r.ms)} | {_num(r.images_per_s)} | {goal} | "
                   f"{'-' if met is None else 'yes' if met else 'no'} | {_pct(frac)} | {_num(at_peak)} |")
    return out + ["", "ms at peak: the FLOPs of the row at the probe's rate. Far below the measured time means the "
                  "stage is bound by launches, memory or host work, not by arithmetic.", ""]


def machine_lines(machine: dict, threads: int) -> list[str]:
    m = machine.get("ntm_edge", {})
    v = m.get("versions", {})
    gpu = ", ".join(m.get("gpu") or []) or "none"
    return [f"- **Machine**: CPU {m.get('cpu_model', '?')}, {m.get('logical_cores', '?')} logical cores "
            f"({m.get('cpu_capability', '?')}); GPU: {gpu}" + (f" (CUDA {m['cuda']})" if m.get("cuda") else "")
            + f"; {m.get('platform', '')}",
            f"- **Threads**: {threads} (torch intra-op threads and onnxruntime intra-op threads)",
            "- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items()),
            f"- **onnxruntime providers here**: {', '.join(m.get('onnxruntime_providers', []))}"]


def markdown(rows: list[Row], peaks: dict[str, float], probes: dict, machine: dict, manifest: dict,
             skipped: dict[str, list[str]]) -> str:
    setup = manifest["setup"]
    lines = ["# ntm-edge bench report", ""]
    if manifest.get("note"):
        lines += [manifest["note"], ""]
    lines += [f"```\n{manifest['command']}\n```", "",
              f"Written {manifest['created']}; the suite ran {manifest['suite_seconds']:.0f} s.", "",
              f"- **Model**: {setup['model']}",
              "- **Bundle** (onnxruntime rows): " + ("exported from the model by the bench (batch 64, fp32, into a "
                                                      "temporary directory)" if setup["exported"] else setup["bundle"]),
              *machine_lines(machine, setup["threads"]),
              "- **Rounds**: " + ("--quick: 3 rounds per benchmark after one warm-up call; rough figures"
                                  if setup["quick"] else "the median of 5 to 100 rounds per benchmark (about 2 s each), "
                                  "after two warm-up calls"),
              "- **Peak** (square matmul probes, same run, best round): " + "; ".join(
                  f"{name} {_num(gflops)} GFLOP/s" for name, (_, gflops) in probes.items())
              + " -> peak " + ", ".join(f"{k} {_num(v)} GFLOP/s" for k, v in peaks.items()),
              "- Sampling: 4 steps, guidance 0; prompts cycle over the classes. Times are medians per call, "
              "for the whole batch.", ""]
    backends = sorted({r.backend for r in rows}, key=_backend_key)
    others = [b for b in backends if b != REFERENCE]
    lines += [f"## Speed against torch eager ({REFERENCE}, CPU fp32), measured side by side in this run", "",
              "Each cell: torch eager's median time over the backend's, same stage, batch and inputs (> 1: faster). "
              "The backends of one row run back to back, seconds apart.", ""]
    lines += ratio_table(rows, REFERENCE, others) + [""]
    cuda_others = [b for b in others if b.startswith(("torch-cuda-fp32", "torch-cuda-bf16", "ort-cuda", "ort-tensorrt"))]
    if CUDA_REFERENCE in backends and cuda_others:
        lines += [f"### GPU backends against torch eager on CUDA ({CUDA_REFERENCE})", ""]
        lines += ratio_table(rows, CUDA_REFERENCE, cuda_others) + [""]
    lines += goals(rows, peaks)
    lines += ["## Per stage: time, throughput and distance to the peak", ""] + stage_table(rows, peaks) + [""]
    lines += ["![bench](report.png)", ""]
    if skipped:
        lines += ["## Not timed here", ""]
        for reason, names in skipped.items():
            lines.append(f"- {', '.join(sorted(set(names), key=_backend_key))}: {reason}")
        lines.append("")
    lines += ["## What the columns count", "",
              "- FLOPs per image: the multiply-adds (x 2) of matrix products, convolutions and attention, counted from "
              "the model config (`ntm_edge/flops.py`, checked against torch's FlopCounterMode); elementwise work, "
              "lookups and memory traffic are not counted, so a label table has none (a text model's MiniLM is counted). "
              "Jacobi and "
              "GS-Jacobi count the passes the run used.",
              "- GFLOP/s = FLOPs per image x batch / median time. % of peak = GFLOP/s over the peak of the same device: "
              "the best round of the fastest square-matmul probe (CPU fp32; on CUDA the fp32 probe for fp32 rows, the "
              "bf16 probe for 16-bit rows). The peak is what the machine can do, a row's median what it did under the "
              "run's load.",
              "- ms: the median time per call for the whole batch; min ms: the best round (the gap between the two is "
              "the run's noise). images/s = batch / median time. End-to-end rows include the noise draw and the uint8 "
              "conversion.", ""]
    return "\n".join(lines)


# -- the chart -------------------------------------------------------------------------------------


def plot(rows: list[Row], peaks: dict[str, float], path: Path) -> None:
    """Images/s (top) and % of peak (bottom) per stage and backend, one column per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r.batch for r in rows})
    labels = list(dict.fromkeys(r.label for r in rows))
    backends = sorted({r.backend for r in rows}, key=_backend_key)
    by: dict[tuple[int, str], dict[str, Row]] = defaultdict(dict)
    for r in rows:
        by[(r.batch, r.backend)][r.label] = r
    fig, axes = plt.subplots(2, len(batches), figsize=(5.2 * len(batches), 2.0 + 0.45 * len(labels) * 2), squeeze=False,
                             sharey=True)
    height = 0.8 / max(1, len(backends))
    for j, batch in enumerate(batches):
        for k, name in enumerate(backends):
            ys = [i + (k - (len(backends) - 1) / 2) * height for i in range(len(labels))]
            cells = [by[(batch, name)].get(label) for label in labels]
            axes[0][j].barh(ys, [c.images_per_s if c else 0 for c in cells], height, label=name)
            fracs = [peak_fraction(c, peaks) if c else None for c in cells]
            axes[1][j].barh(ys, [100 * f if f else 0 for f in fracs], height, label=name)
        for ax, title in ((axes[0][j], f"images/s, batch {batch}"), (axes[1][j], f"% of peak, batch {batch}")):
            ax.set_xscale("log")
            ax.set_title(title)
            ax.grid(axis="x", alpha=0.3)
            ax.set_yticks(range(len(labels)), labels)
    axes[0][0].invert_yaxis()  # the axes share y: once for all, stages top to bottom in report order
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def write_report(work: Path, manifest: dict, skipped: dict[str, list[str]]) -> None:
    """report.md and report.png in ``work`` from its benchmark.json."""
    from .bench import JSON, PLOT, REPORT

    rows, peaks, probes, machine = load(work / JSON)
    atomic_write_text(work / REPORT, markdown(rows, peaks, probes, machine, manifest, skipped))
    plot(rows, peaks, work / PLOT)
