"""Tables of `ntm-edge eval` records over seeds: per run, and mean (range) per model.

Each argument is LABEL=GLOB: the records of one model (one run per training seed, each evaluated at
several guidance scales and temperatures). A record's run is its file name up to ``-T<steps>-`` or
``-g``; the columns are the (guidance, temperature) pairs found. Only records at ``--steps`` sampling steps and
``--num-samples`` samples count, so one glob may cover a run's other evaluations.

    python benchmarks/seed_table.py --steps 3 \\
        "NTM, NLL only=benchmarks/reports/default_model/pw3-nll-s?-T3-*.json" \\
        "identity f_T=benchmarks/reports/default_model/pw3-id-s?-T3-*.json" \\
        "FM-Euler=benchmarks/reports/default_model/fm-s?-T3-*.json"

The README's few-step tables are this script's output on the committed records.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import statistics
import sys
from pathlib import Path


def load(pattern: str, steps: int, num_samples: int) -> dict[str, dict[tuple[float, float], dict]]:
    """run -> {(guidance, temperature): the record's row}, for the records of ``pattern`` at ``steps`` steps
    and ``num_samples`` samples. A record's run is its file name up to ``-T<steps>-`` or ``-g`` (the
    records of one trained model share it: ``pw3-nll-s0-T3-g0-t0.8-n2000.json`` is run ``pw3-nll-s0``)."""
    runs: dict[str, dict] = {}
    for path in sorted(glob.glob(pattern)):
        try:
            record = json.loads(Path(path).read_text())
            row = record["rows"][0]
            # a record written before `eval --temperature` existed sampled at temperature 1
            key = (float(record["guidance"]), float(record.get("temperature", 1.0)))
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise SystemExit(f"{path}: not an `ntm-edge eval` record ({e.__class__.__name__}: {e})") from None
        if row["steps"] != steps or record["num_samples"] != num_samples:
            continue
        run = re.split(r"-T\d+-|-g[0-9.]", Path(path).stem)[0]
        if key in runs.setdefault(run, {}):
            raise SystemExit(f"{path}: a second record of {run} at guidance {key[0]:g}, temperature {key[1]:g}")
        runs[run][key] = {**row, "objective": record["objective"]}
    return runs


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.mean(values):{fmt}} ({max(values) - min(values):{fmt}})"


def best(cells: dict[tuple[float, float], dict]) -> tuple[tuple[float, float], dict]:
    """A run's lowest Frechet distance over the settings it was evaluated at: ((guidance, temperature), row)."""
    return min(cells.items(), key=lambda item: item[1]["frechet"])


def tables(models: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per run (Frechet / prompt accuracy per column, the run at its best setting,
    bits/dim, the transporter's displacement and log-det per level), then the mean (range) over each
    model's runs (a column only where every run has it; "at its best": of each run's own best)."""
    cols = sorted({key for runs in models.values() for cells in runs.values() for key in cells},
                  key=lambda k: (k[0], -k[1]))
    head = " | ".join(f"g {g:g}, tau {t:g}" for g, t in cols)
    out = [f"| model | run | bits/dim | {head} | at its best | displacement (log-det/dim) per level |",
           "|---|---|---|" + "---|" * (len(cols) + 2)]
    for label, runs in models.items():
        for name, cells in runs.items():
            first = next(iter(cells.values()))
            bits = f"{first['bits_per_dim']:.3f}" if first["objective"] != "fm" else "-"
            levels = (first.get("transporter") or [])[:-1]  # the last entry is t = 1 (no transporter step)
            moved = any(level["displacement"] > 0 for level in levels)
            act = " / ".join(f"{a['displacement']:.3f} ({a['logdet_per_dim']:+.2f})" for a in levels) if moved else "-"
            row = [f"{cells[k]['frechet']:.2f} / {cells[k]['prompt_accuracy']:.3f}" if k in cells else "-"
                   for k in cols]
            (g, t), top = best(cells)
            row.append(f"{top['frechet']:.2f} / {top['prompt_accuracy']:.3f} (g {g:g}, tau {t:g})")
            out.append(f"| {label} | {name} | {bits} | " + " | ".join(row) + f" | {act} |")
    out += ["", f"| model | runs | bits/dim | {head} | each run at its best |",
            "|---|---|---|" + "---|" * (len(cols) + 1)]
    for label, runs in models.items():
        firsts = [next(iter(cells.values())) for cells in runs.values()]
        bits = spread([f["bits_per_dim"] for f in firsts], ".3f") if firsts[0]["objective"] != "fm" else "-"
        row = []
        for k in cols:
            have = [cells[k] for cells in runs.values() if k in cells]
            row.append(f"{spread([c['frechet'] for c in have], '.2f')} / "
                       f"{statistics.mean(c['prompt_accuracy'] for c in have):.3f}" if len(have) == len(runs) else "-")
        tops = [best(cells)[1] for cells in runs.values()]
        row.append(f"{spread([c['frechet'] for c in tops], '.2f')} / "
                   f"{statistics.mean(c['prompt_accuracy'] for c in tops):.3f}")
        out.append(f"| {label} | {len(runs)} | {bits} | " + " | ".join(row) + " |")
    return "\n".join(out) + "\n" + level_table(models)


def level_table(models: dict[str, dict[str, dict]]) -> str:
    """Markdown: the trajectory NLL per level (``level_nats_per_dim``, nats/dim, t_0 .. t_T), mean (range)
    over each model's runs, and each model's mean minus the first model's: which step a likelihood gain
    is in (the eval scores every model on the same trajectories for one seed). Empty where a model has no
    such figure (flow matching; records written before `eval` reported it)."""
    levels: dict[str, list[list[float]]] = {}  # model -> per run, its terms t_0 .. t_T
    for label, runs in models.items():
        firsts = [next(iter(cells.values())) for cells in runs.values()]
        if all(f["objective"] != "fm" and "level_nats_per_dim" in f for f in firsts):
            levels[label] = [f["level_nats_per_dim"] for f in firsts]
    if not levels:
        return ""
    K = len(next(iter(levels.values()))[0])
    head = " | ".join(f"t_{k}" for k in range(K - 1)) + f" | t_{K - 1} (N(0, I) top)"
    out = ["", f"| model | runs | {head} |", "|---|---|" + "---|" * K]
    first = next(iter(levels))
    for label, per_run in levels.items():
        out.append(f"| {label} | {len(per_run)} | "
                   + " | ".join(f"{statistics.mean(v):+.4f} ({max(v) - min(v):.4f})"
                                for v in ([run[k] for run in per_run] for k in range(K))) + " |")
    for label, per_run in list(levels.items())[1:]:
        diff = [statistics.mean(run[k] for run in per_run) - statistics.mean(run[k] for run in levels[first])
                for k in range(K)]
        out.append(f"| {label} minus {first} | | " + " | ".join(f"{d:+.4f}" for d in diff) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", metavar="LABEL=GLOB", help="one model's eval records")
    ap.add_argument("--steps", type=int, default=4, help="the sampling steps of the records to count")
    ap.add_argument("--num-samples", type=int, default=2000, help="the sample count of the records to count")
    args = ap.parse_args(argv)
    models = {}
    for spec in args.models:
        label, sep, pattern = spec.partition("=")
        if not sep or not label or not pattern:
            ap.error(f"{spec!r} is not LABEL=GLOB")
        models[label] = load(pattern, args.steps, args.num_samples)
        if not models[label]:
            ap.error(f"{label}: no eval record at {args.steps} steps and {args.num_samples} samples matches {pattern}")
    sys.stdout.write(tables(models))


if __name__ == "__main__":
    main()
