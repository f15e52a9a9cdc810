"""`ntm-edge compare`: eval reports of several models -> one table (Markdown) and one PNG plot.

Rows: one per (model, step count); columns: bits/dim, Frechet distance, prompt accuracy. No speed
column: reports of older versions carry an images/s figure measured during the eval (machine-load
noise); it is ignored. Speed is `ntm-edge bench`'s job.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import NtmError
from .fileio import atomic_write, atomic_write_text

LABELS = {"ntm": "NTM", "gaussian": "Gaussian", "fm": "FM-Euler"}
COLUMNS = ("bits/dim", "Frechet", "prompt acc.")


def load_reports(paths) -> list[dict]:
    reports = []
    for p in map(Path, paths):
        try:
            report = json.loads(p.read_text())
            report["rows"]  # noqa: B018  (a report must have rows)
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise NtmError(f"{p} is not an `ntm-edge eval` report ({e.__class__.__name__})") from None
        reports.append(report)
    return merge_reports(reports)


def merge_reports(reports: list[dict]) -> list[dict]:
    """Reports of one model (same checkpoint, exit, guidance, samples and label) from several `eval`
    calls become one, rows sorted by step count; the first report's other fields are kept."""
    merged: dict[tuple, dict] = {}
    for r in reports:
        key = (r.get("checkpoint"), r.get("final"), r.get("guidance"), r.get("num_samples"), r.get("label"))
        if key in merged:
            rows = {row["steps"]: row for row in merged[key]["rows"] + r["rows"]}
            merged[key]["rows"] = [rows[k] for k in sorted(rows)]
        else:
            merged[key] = {**r, "rows": sorted(r["rows"], key=lambda row: row["steps"])}
    return list(merged.values())


def table_rows(reports: list[dict]) -> list[tuple]:
    """-> (label, bits/dim, Frechet, prompt accuracy) per model and step count."""
    rows = []
    for r in reports:
        name = r.get("label") or LABELS.get(r["objective"], r["objective"])
        for row in r["rows"]:
            rows.append((f"{name} T={row['steps']}", row["bits_per_dim"], row["frechet"], row["prompt_accuracy"]))
    return rows


def markdown_table(reports: list[dict]) -> str:
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for label, bpd, fd, acc in table_rows(reports):
        lines.append(f"| {label} | {bpd:.3f} | {fd:.2f} | {acc:.3f} |")
    real = reports[0].get("real_data")
    if real:
        lines.append(f"| real held-out images | - | {real['frechet']:.2f} | {real['prompt_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(reports: list[dict], path) -> None:
    """Frechet distance and prompt accuracy against the number of steps, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in reports:
        name = r.get("label") or LABELS.get(r["objective"], r["objective"])
        steps = [row["steps"] for row in r["rows"]]
        style = dict(marker="o", label=name, linestyle="-" if len(steps) > 1 else "none")
        axes[0].plot(steps, [row["frechet"] for row in r["rows"]], **style)
        axes[1].plot(steps, [row["prompt_accuracy"] for row in r["rows"]], **style)
    for ax, title in zip(axes, ("Frechet distance (lower is better)", "prompt accuracy"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def compare(report_paths, out_table=None, out_plot=None) -> str:
    reports = load_reports(report_paths)
    table = markdown_table(reports)
    if out_table:
        atomic_write_text(Path(out_table), table)
    if out_plot:
        plot(reports, out_plot)
    return table
