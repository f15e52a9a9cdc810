"""Does the transporter earn its place? (issue 13) A reproducible comparison of NTM variants, the
identity-transporter ablation and flow matching at equal training compute, >= 2 seeds each, then one
Markdown table. Two sizes (``--preset``):

- ``tiny`` (the default): `digits` (8x8), label prompts, about 5 CPU-minutes per model at 800 steps.
- ``small``: the default model's size, mnist5k (28x28) with MiniLM prompts, pairwise on the 4-step grid,
  about 20 minutes of one thread per model at 1774 steps (``--ntm-steps 1774``, the README's table);
  its ``2`` rows (``s_ntm2``, ``s_id2``, ``s_fm2``) make the same comparison on the 2-step grid (trained on
  it alone, sampled at 2 steps; ``s_fm2`` samples ``s_fm``'s model at 2 steps, trained once for both);
  ``s_ft`` and ``s_idft`` are the paper's route: one FM run per seed for half the budget, finetuned for the
  other half into the NTM and into the identity ablation (``train --init-from``, with mean alignment);
  ``s_ft_a0`` finetunes the same FM run without the alignment.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/transporter_study.py --out runs/transporter_study \
        [--preset tiny|small] [--ntm-steps 600] [--seeds 0 1] [--rows ntm_u ntm_0 ...] [--guidance 0 0.5 1] \
        [--temperature 1 0.9] [--device cuda] [--table benchmarks/reports/transporter_study.md] [--plan]

Compute: by default every row trains ``--ntm-steps`` optimizer steps of batch 64, so no row gets more
compute than the preset's NTM (the ablation and the baselines cost less per step: the comparison leans
their way; the 4-block row costs more, its CPU seconds say how much). Rows marked "at the NTM's CPU
seconds" (all of ``small``'s) scale their steps by per-step costs measured side by side once (below).
With ``--calibrate`` every row gets the CPU seconds of ``--ntm-steps`` NTM steps instead: each row's
per-step CPU cost (process time of the training subprocess) is measured first as the slope between a
20-step and an 80-step run (which cancels start-up and loading), and its step count is scaled to match.
The training CPU seconds actually spent (start-up included) are reported per row. Every row is
evaluated with the same exit: the exact transporter inverse for the u-space models (no denoiser is
trained, so none is counted), Euler for flow matching, at guidance 0 and 4 steps (the 2-step rows at 2);
``--guidance`` adds a sweep of
classifier-free guidance scales (Frechet and prompt accuracy trade against each other along it), and
``--temperature`` crosses that sweep with sampling temperatures (``ntm-edge eval --temperature``).
``--plan`` prints each row's training command and step count and trains nothing; ``--train-only`` trains
every row's models and evaluates none (a later call without it evaluates them: a trained model is reused,
as is any evaluation already on disk), for a machine that trains fast and a slower one that judges. Runs are sequential;
to use two cores, run two seeds into two --out folders at once and join them with --merge.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "ntm_edge"]

# name -> (label, extra `ntm-edge train` arguments). tiny's own x0_mse_weight is 0.
ROWS: dict[str, tuple[str, list[str]]] = {
    "ntm_0": ("NTM, NLL only (x0-MSE 0, tiny as-is)", ["--x0-mse-weight", "0"]),
    "id_0": ("identity f_T + learned scale, NLL only", ["--transporter-blocks", "0", "--x0-mse-weight", "0"]),
    "ntm_lr": ("NTM, NLL only, transporter lr x10", ["--x0-mse-weight", "0", "--transporter-lr-scale", "10"]),
    "ntm_b4": ("NTM, NLL only, 4 transporter blocks", ["--x0-mse-weight", "0", "--transporter-blocks", "4"]),
    "ntm_x": ("NTM, hybrid x0-MSE 1.0 in x-space (the default target)",
              ["--x0-mse-weight", "1", "--x0-mse-space", "x"]),
    "ntm_u": ("NTM, hybrid x0-MSE 1.0 in u-space (--x0-mse-space u)", ["--x0-mse-weight", "1", "--x0-mse-space", "u"]),
    "id_1": ("identity f_T + learned scale, x0-MSE 1.0", ["--transporter-blocks", "0", "--x0-mse-weight", "1"]),
    "gauss_1": ("Gaussian (f_T = id, sigma = C), x0-MSE 1.0", ["--objective", "gaussian", "--x0-mse-weight", "1"]),
    "fm": ("FM, Euler", ["--objective", "fm"]),
    "ntm_pw": ("NTM, NLL only, pairwise mode (one step per example, T in {4, 8, 16})",
               ["--x0-mse-weight", "0", "--mode", "pairwise"]),
    "id_0_eq": ("identity f_T + learned scale, NLL only, at the NTM's CPU seconds",
                ["--transporter-blocks", "0", "--x0-mse-weight", "0"]),
    "fm_eq": ("FM, Euler, at the NTM's CPU seconds", ["--objective", "fm"]),
    "ntm_pw_eq": ("NTM, NLL only, pairwise mode, at the end-to-end NTM's CPU seconds",
                  ["--x0-mse-weight", "0", "--mode", "pairwise"]),
    "ntm_pw_x": ("NTM, pairwise mode, hybrid x0-MSE 1.0 in x-space (the default model's recipe)",
                 ["--x0-mse-weight", "1", "--x0-mse-space", "x", "--mode", "pairwise"]),
    "ntm_pw_x_eq": ("NTM, pairwise mode, hybrid x0-MSE 1.0 in x-space, at the end-to-end NTM's CPU seconds",
                    ["--x0-mse-weight", "1", "--x0-mse-space", "x", "--mode", "pairwise"]),
    "ntm_pw4": ("NTM, NLL only, pairwise mode on the 4-step grid alone (T = 4, as end-to-end trains)",
                ["--x0-mse-weight", "0", "--mode", "pairwise", "--pairwise-steps", "4"]),
    "ntm_pw4_eq": ("NTM, NLL only, pairwise mode, T = 4 alone, at the end-to-end NTM's CPU seconds",
                   ["--x0-mse-weight", "0", "--mode", "pairwise", "--pairwise-steps", "4"]),
    "id_pw4": ("identity f_T + learned scale, NLL only, pairwise mode, T = 4 alone",
               ["--transporter-blocks", "0", "--x0-mse-weight", "0", "--mode", "pairwise", "--pairwise-steps", "4"]),
    "id_pw4_eq": ("identity f_T + learned scale, NLL only, pairwise mode, T = 4 alone, at the end-to-end NTM's "
                  "CPU seconds", ["--transporter-blocks", "0", "--x0-mse-weight", "0", "--mode", "pairwise",
                                  "--pairwise-steps", "4"]),
    "ctx_pw4_eq": ("contextual NTM (f_T of level s reads x_t), NLL only, pairwise mode, T = 4 alone, at the "
                   "end-to-end NTM's CPU seconds", ["--x0-mse-weight", "0", "--mode", "pairwise", "--pairwise-steps",
                                                    "4", "--transporter-context"]),
    "ntm_p1": ("NTM, NLL only, transporter patch 1 (a token per pixel)",
               ["--x0-mse-weight", "0", "--transporter-patch", "1"]),
    "ntm_ft": ("NTM finetuned from FM (the paper's route): FM for half the steps, then NTM, NLL + mean alignment",
               ["--x0-mse-weight", "0"]),
    # --preset small: the default model's size, every row on the 4-step grid (pairwise, T = 4)
    "s_ntm": ("NTM, NLL only", ["--x0-mse-weight", "0", "--pairwise-steps", "4"]),
    "s_id": ("identity f_T + learned scale, NLL only, at the NTM's CPU seconds",
             ["--transporter-blocks", "0", "--x0-mse-weight", "0", "--pairwise-steps", "4"]),
    "s_ntm_x": ("NTM, hybrid x0-MSE 1.0 in x-space (the default model's recipe)",
                ["--x0-mse-weight", "1", "--pairwise-steps", "4"]),
    "s_id_x": ("identity f_T + learned scale, hybrid x0-MSE 1.0, at the NTM's CPU seconds",
               ["--transporter-blocks", "0", "--x0-mse-weight", "1", "--pairwise-steps", "4"]),
    "s_fm": ("FM, Euler, at the NTM's CPU seconds", ["--objective", "fm", "--x0-mse-weight", "0"]),
    "s_ctx": ("contextual NTM (f_T of level s reads x_t), NLL only, at the NTM's CPU seconds",
              ["--x0-mse-weight", "0", "--pairwise-steps", "4", "--transporter-context"]),
    # the same comparison on the 2-step grid, where one Gaussian step fits the posterior worst
    "s_ntm2": ("NTM, NLL only, 2-step grid", ["--x0-mse-weight", "0", "--pairwise-steps", "2"]),
    "s_id2": ("identity f_T + learned scale, NLL only, 2-step grid, at the NTM's CPU seconds",
              ["--transporter-blocks", "0", "--x0-mse-weight", "0", "--pairwise-steps", "2"]),
    "s_fm2": ("FM, Euler at 2 steps (the s_fm model)", []),  # trains nothing of its own (SAME_MODEL)
    # the paper's route at the default model's size: FM for half the NTM's seconds, then finetuned (PRETRAINED)
    "s_ft": ("NTM finetuned from FM: FM for half the NTM's CPU seconds, then NTM, NLL + mean alignment",
             ["--x0-mse-weight", "0", "--pairwise-steps", "4"]),
    "s_idft": ("identity f_T + learned scale finetuned from the same FM model, NLL + mean alignment",
               ["--transporter-blocks", "0", "--x0-mse-weight", "0", "--pairwise-steps", "4"]),
    "s_ft_a0": ("NTM finetuned from the same FM model, NLL only (no mean alignment)",
                ["--x0-mse-weight", "0", "--pairwise-steps", "4", "--align-weight", "0"]),
}
# rows sampled (and scored) at another step count than 4
SAMPLE_STEPS = {"s_ntm2": 2, "s_id2": 2, "s_fm2": 2}
# rows that evaluate another row's model (trained once, into that row's folder; its CPU seconds are theirs too)
SAME_MODEL = {"s_fm2": "s_fm"}

# preset -> (the `ntm-edge train` arguments every row shares, the row whose step is the budget's unit)
PRESETS: dict[str, tuple[list[str], str]] = {
    "tiny": (["--dataset", "digits", "--preset", "tiny", "--batch-size", "64", "--lr", "2e-3"], "ntm_0"),
    "small": (["--dataset", "mnist5k", "--preset", "small", "--text-encoder", "minilm", "--batch-size", "64"], "s_ntm"),
}


@dataclasses.dataclass(frozen=True)
class Pretrain:
    """A row that starts from a flow-matching run: FM takes ``share`` of the row's budget (in NTM steps), the
    finetune (``--init-from`` the FM model) the rest, each converted to its own steps at equal CPU seconds by
    ``fm_scale`` and ``ft_scale`` (steps per NTM step). The FM run's CPU seconds count in the row's. ``owner``:
    the row whose FM run (same seed) this row finetunes too, trained once. ``--calibrate`` leaves these
    ratios as they are (it measures the from-scratch rows)."""

    share: float
    fm_row: str  # the preset's FM row: its training arguments
    fm_scale: float = 1.0
    ft_scale: float = 1.0
    owner: str | None = None

    def steps(self, budget: int) -> tuple[int, int]:
        """-> (FM steps, finetune steps) of a row whose budget is ``budget`` NTM steps."""
        fm_share = max(1, round(budget * self.share))
        return max(1, round(fm_share * self.fm_scale)), max(1, round((budget - fm_share) * self.ft_scale))

    def fm_dir(self, row: str, seed: int | str, out: Path) -> Path:
        return out / f"{self.owner or row}_s{seed}_fm"


# A finetune step costs more than a from-scratch step (the frozen teacher's forward pass for the mean
# alignment): on `small`, pairwise T = 4, one thread, side by side, 2026-12-07 (the slope between a 5- and a
# 45-step run): NTM 0.862, NTM finetune 1.168, identity finetune 0.996 CPU s/step, so 1774 NTM steps' seconds
# are 1309 finetune steps, 1536 identity-finetune steps
PRETRAINED = {"ntm_ft": Pretrain(0.5, "fm"),
              "s_ft": Pretrain(0.5, "s_fm", 2269 / 1774, 1309 / 1774),
              "s_idft": Pretrain(0.5, "s_fm", 2269 / 1774, 1536 / 1774, owner="s_ft"),
              "s_ft_a0": Pretrain(0.5, "s_fm", 2269 / 1774, 1.0, owner="s_ft")}  # no teacher pass: an NTM step
# rows that train --ntm-steps x this many steps: the ratio of CPU seconds per step measured side by side
# (one thread, 800 steps, 2 seeds, in this study's first run) of the NTM (`ntm_0`: 276 s) and the row's
# model (`id_0`: 241 s, `fm`: 70 s, `ntm_pw`: 89.5 s), so that the row gets the NTM's compute
# (a pairwise step costs the same whatever grid T is drawn from); the identity's pairwise T = 4 step costs
# 108 / 145 of the NTM's (2467 steps each, seed 0, side by side, 2026-12-06). `small`: 1774 NTM steps took
# 1196 s of one thread, 2245 identity steps 1197 s, 2269 FM steps 1196 s (side by side, 2026-12-06)
STEP_SCALE = {"id_0_eq": 276 / 241, "fm_eq": 276 / 70, "ntm_pw_eq": 276 / 89.5, "ntm_pw_x_eq": 276 / 89.5,
              "ntm_pw4_eq": 276 / 89.5, "id_pw4_eq": 276 / 89.5 * 145 / 108,
              "s_id": 2245 / 1774, "s_id_x": 2245 / 1774, "s_fm": 2269 / 1774,
              "s_id2": 2245 / 1774,
              # the contextual NTM's pairwise T = 4 step maps one level instead of two: `tiny`, one thread, side by
              # side, the slope between a 40- and a 440-step run (2026-12-07): NTM 0.194, contextual 0.181 CPU s/step
              "ctx_pw4_eq": 276 / 89.5 * 0.194 / 0.181,
              # `small` likewise, the slope between a 10- and a 70-step run: NTM 2.402, contextual 2.213 CPU s/step
              "s_ctx": 1925 / 1774}


def model_of(name: str) -> str:
    """The row whose model ``name`` evaluates (its own, or the one it shares): its folder, steps and cost."""
    return SAME_MODEL.get(name, name)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd: list[str], log: Path) -> float:
    """Run one command to completion (output to ``log``) -> its CPU seconds."""
    before = cpu_seconds()
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")
    return cpu_seconds() - before


@dataclasses.dataclass(frozen=True)
class Study:
    """What every command of one study shares: the preset's training arguments and the device."""

    base: list[str]
    device: str = "cpu"
    heldout_images: int | None = None  # eval's --heldout-images (None: the whole test split)

    def train_cmd(self, out: Path, steps: int, extra: list[str], seed: int | str) -> list[str]:
        return [*CLI, "train", *self.base, "--steps", str(steps), "--checkpoint-every", "100000", "--eval-images", "0",
                "--seed", str(seed), "--device", self.device, "--out", str(out), *extra]

    def train(self, out: Path, steps: int, extra: list[str], seed: int) -> float:
        return run(self.train_cmd(out, steps, extra, seed), out.with_suffix(".log"))

    def train_row(self, ckpt: Path, name: str, steps: int, seed: int) -> float:
        """Train one row's model into ``ckpt`` -> the CPU seconds of all its training (a pretraining included).
        A model trained before (its seconds recorded beside it) is not trained again: a row can share it."""
        record = cpu_record(ckpt)
        if record is not None:
            return record["cpu_s"]  # its step count: checked before any training (main)
        cpu = self._train_row(ckpt, name, steps, seed)
        ckpt.with_suffix(".cpu_s").write_text(json.dumps({"steps": steps, "cpu_s": cpu}))
        return cpu

    def _train_row(self, ckpt: Path, name: str, steps: int, seed: int) -> float:
        if name not in PRETRAINED:
            return self.train(ckpt, steps, ROWS[name][1], seed)
        pre = PRETRAINED[name]
        fm_steps, ft_steps = pre.steps(steps)
        fm = pre.fm_dir(name, seed, ckpt.parent)
        spent = fm.with_suffix(".cpu_s")  # the pretraining's CPU seconds, kept for a resumed study (and its sharer)
        if not spent.exists():
            spent.write_text(str(self.train(fm, fm_steps, ROWS[pre.fm_row][1], seed)))
        return float(spent.read_text()) + self.train(ckpt, ft_steps, [*ROWS[name][1], "--init-from", str(fm)], seed)

    def per_step_cost(self, root: Path, name: str, extra: list[str]) -> float:
        """CPU seconds per training step of a row: the slope between a 20- and an 80-step run."""
        a = self.train(root / f"calib_{name}_20", 20, extra, 0)
        b = self.train(root / f"calib_{name}_80", 80, extra, 0)
        return (b - a) / 60

    def evaluate(self, ckpt: Path, num_samples: int, guidance: float = 0.0, temperature: float = 1.0,
                 steps: int = 4) -> dict:
        """`ntm-edge eval` of one model at ``steps`` steps (its report; kept beside the checkpoint, reused if there)."""
        stem = ckpt.name + ("_eval" if guidance == 0 else f"_eval_g{guidance:g}") + \
            ("" if temperature == 1 else f"_t{temperature:g}") + ("" if steps == 4 else f"_T{steps}")
        out = ckpt.with_name(stem + ".json")
        if not out.exists():
            run([*CLI, "eval", "--checkpoint", str(ckpt), "--steps", str(steps), "--num-samples", str(num_samples),
                 "--guidance", f"{guidance:g}", "--temperature", f"{temperature:g}", "--device", self.device,
                 *([] if self.heldout_images is None else ["--heldout-images", str(self.heldout_images)]),
                 "--out", str(out)],
                ckpt.with_name(stem + ".log"))
        return json.loads(out.read_text())


def cpu_record(ckpt: Path) -> dict | None:
    """The record beside a row's trained model in ``ckpt``: {"steps": its step count (None in a record written
    before it held one: seconds alone), "cpu_s": its training's CPU seconds}; None: not trained yet."""
    spent = ckpt.with_suffix(".cpu_s")
    if not spent.exists():
        return None
    record = json.loads(spent.read_text())
    return {"steps": int(record["steps"]), "cpu_s": float(record["cpu_s"])} if isinstance(record, dict) else \
        {"steps": None, "cpu_s": float(record)}


def per_level(act: list[list[dict]], K: int, key: str, fmt: str) -> str:
    """The mean over seeds of one activity figure, per level t_0 .. t_(K-1), "a / b / ..." ("nan": not
    measured by that eval)."""
    return " / ".join(format(statistics.mean(a[k].get(key, float("nan")) for a in act), fmt) for k in range(K))


def cell(vals: list[float], fmt: str) -> str:
    """One figure over seeds: the value, or "mean (min..max)"."""
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{format(statistics.mean(vals), fmt)} ({format(min(vals), fmt)}..{format(max(vals), fmt)})"


def summarise(results: dict, rows: list[str]) -> str:
    """Markdown: one line per row, mean and (min..max over seeds) of each figure."""
    lines = ["| row | steps | train CPU s | sampling steps | bits/dim | Frechet | prompt acc. | displacement t0, t1, .. "
             "| beyond rescale t0, t1, .. | log-det/dim t0, t1, .. |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in rows:
        runs = results.get(name, [])
        if not runs:
            continue
        evals = [r["eval"]["rows"][0] for r in runs]
        act = [e.get("transporter") for e in evals]
        disp = shape = ldet = "-"
        if all(act):
            K = len(act[0]) - 1  # t = 1 is the identity by construction
            disp, shape, ldet = (per_level(act, K, key, fmt) for key, fmt in
                                 (("displacement", ".3f"), ("shape_displacement", ".3f"), ("logdet_per_dim", "+.3f")))
        # flow matching samples with deterministic Euler steps: its "bits/dim" (the trajectory likelihood of its
        # Gaussian-posterior reading) is not the density of what it samples, so it is left out
        bits = "-" if runs[0]["eval"]["objective"] == "fm" else cell([e["bits_per_dim"] for e in evals], ".3f")
        lines.append(f"| {ROWS[name][0]} | {runs[0]['steps']} | {cell([r['cpu_s'] for r in runs], '.0f')} | "
                     f"{evals[0]['steps']} | {bits} | {cell([e['frechet'] for e in evals], '.2f')} | "
                     f"{cell([e['prompt_accuracy'] for e in evals], '.3f')} | {disp} | {shape} | {ldet} |")
    return "\n".join(lines) + "\n"


def sweep_key(guidance: float, temperature: float = 1.0) -> str:
    """A sweep point's key in a run's record: "0.5" (temperature 1, as before temperatures existed), "0.5@t0.9"."""
    return f"{guidance:g}" if temperature == 1 else f"{guidance:g}@t{temperature:g}"


def summarise_guidance(results: dict, rows: list[str], guidance: list[float], temperature=(1.0,)) -> str:
    """Markdown: Frechet and prompt accuracy of each row at each guidance scale (and temperature), mean
    (min..max) over seeds."""
    points = [(g, t) for t in temperature for g in guidance]
    head = [f"guidance {g:g}" + ("" if t == 1 else f", temperature {t:g}") + ": Frechet / acc." for g, t in points]
    lines = ["| row | " + " | ".join(head) + " |", "|---|" + "---|" * len(points)]
    for name in rows:
        runs = results.get(name, [])
        if not runs or any(sweep_key(g, t) not in r.get("guidance", {}) for r in runs for g, t in points):
            continue
        cells = []
        for g, t in points:
            evals = [r["guidance"][sweep_key(g, t)] for r in runs]
            cells.append(f"{cell([e['frechet'] for e in evals], '.2f')} / {cell([e['prompt_accuracy'] for e in evals], '.3f')}")
        lines.append(f"| {ROWS[name][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "transporter_study")
    ap.add_argument("--ntm-steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--preset", choices=list(PRESETS), default="tiny",
                    help="tiny: digits 8x8 (rows without s_); small: mnist5k 28x28 with MiniLM prompts (the s_ rows)")
    ap.add_argument("--rows", nargs="+", default=None, choices=list(ROWS), help="default: every row of the preset")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N, for training and evaluation")
    ap.add_argument("--plan", action="store_true", help="print each row's training command and train nothing")
    ap.add_argument("--train-only", action="store_true",
                    help="train every row's models and evaluate none (a later call without it evaluates them)")
    ap.add_argument("--num-samples", type=int, default=500)
    ap.add_argument("--heldout-images", type=int, default=None,
                    help="test images each eval scores bits/dim on (default: the whole test split; fewer: a quick run)")
    ap.add_argument("--guidance", type=float, nargs="+", default=[],
                    help="also evaluate every trained model at these classifier-free guidance scales (the main table "
                         "is at guidance 0) and print a second table: Frechet and prompt accuracy per scale")
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0],
                    help="the guidance sweep at each of these sampling temperatures (default 1)")
    ap.add_argument("--calibrate", action="store_true", help="equal CPU seconds instead of equal steps")
    ap.add_argument("--table", type=Path, default=None, help="also write the Markdown table here")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's record (joined with --merge) here")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="other --out folders of this study (e.g. another seed run at the same time): their results "
                         "join the table")
    args = ap.parse_args()
    base, unit = PRESETS[args.preset]
    mine = [k for k in ROWS if k.startswith("s_") == (args.preset == "small")]
    args.rows = args.rows or mine
    if other := [k for k in args.rows if k not in mine]:
        ap.error(f"rows {', '.join(other)} are not rows of --preset {args.preset} (its rows: {', '.join(mine)})")
    if args.plan and args.calibrate:
        ap.error("--plan prints the fixed equal-compute step counts; --calibrate measures its own first, so it "
                 "cannot plan")
    if args.plan and args.train_only:
        ap.error("--plan trains nothing; --train-only trains without evaluating: choose one")
    study = Study(base, args.device, args.heldout_images)
    args.out = args.out.resolve()  # the training and eval subprocesses run in the repository root
    if args.plan:
        for name in args.rows:
            if name in SAME_MODEL:
                print(f"{name}: {ROWS[name][0]}\n  the model of {SAME_MODEL[name]}, sampled at "
                      f"{SAMPLE_STEPS.get(name, 4)} steps")
                continue
            steps = round(args.ntm_steps * STEP_SCALE.get(name, 1.0))
            cmds = [study.train_cmd(args.out / f"{name}_sSEED", steps, ROWS[name][1], "SEED")]
            if pre := PRETRAINED.get(name):  # the FM run, then the finetune
                fm_steps, ft_steps = pre.steps(steps)
                fm = pre.fm_dir(name, "SEED", args.out)
                cmds = [study.train_cmd(fm, fm_steps, ROWS[pre.fm_row][1], "SEED"),
                        study.train_cmd(args.out / f"{name}_sSEED", ft_steps, [*ROWS[name][1], "--init-from", str(fm)],
                                        "SEED")]
            shown = "".join(f"\n  ntm-edge {' '.join(cmd[cmd.index('train'):])}" for cmd in cmds)
            print(f"{name}: {ROWS[name][0]}{shown}"
                  + (f"\n  sampled at {SAMPLE_STEPS[name]} steps" if name in SAMPLE_STEPS else ""))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    state_path = args.out / "study.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else \
        {"cost": {}, "results": {}, "preset": args.preset}
    if state.setdefault("preset", "tiny") != args.preset:  # a study written before --preset existed is tiny
        raise SystemExit(f"{args.out} holds a --preset {state['preset']} study; choose another --out")

    def save() -> None:
        """Write the study's record (resumable), first taking in what another call on the same --out wrote since
        (two calls training different rows into one folder at once would otherwise each drop the other's)."""
        from filelock import FileLock

        with FileLock(str(state_path) + ".lock"):
            if state_path.exists():
                disk = json.loads(state_path.read_text())
                for name, cost in disk["cost"].items():
                    state["cost"].setdefault(name, cost)
                for name, runs in disk["results"].items():
                    mine = {r["seed"] for r in state["results"].get(name, [])}
                    state["results"].setdefault(name, []).extend(r for r in runs if r["seed"] not in mine)
            tmp = state_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(state, indent=1))
            tmp.replace(state_path)
    for name in dict.fromkeys(map(model_of, [unit, *args.rows])) if args.calibrate else []:  # the NTM's: the unit
        if name not in state["cost"] and name not in PRETRAINED:
            state["cost"][name] = study.per_step_cost(args.out, name, ROWS[name][1])
            print(f"{name}: {state['cost'][name]:.3f} CPU s/step", flush=True)
            save()
    budget = args.ntm_steps * state["cost"][unit] if args.calibrate else 0.0

    def steps_of(name: str) -> int:
        if name in PRETRAINED:  # a budget in NTM steps, split by the row's fixed ratios (not calibrated)
            return args.ntm_steps
        return max(1, round(budget / state["cost"][model_of(name)])) if args.calibrate else \
            round(args.ntm_steps * STEP_SCALE.get(model_of(name), 1.0))
    # before any training: a model or result of this folder at another step count would join the table silently
    stale = {f"{name} seed {r['seed']}: {r['steps']}" for name in args.rows for r in state["results"].get(name, [])
             if r["steps"] != steps_of(name)}
    stale |= {f"{name} seed {seed}: {was}" for name in args.rows for seed in args.seeds
              if (was := (cpu_record(args.out / f"{model_of(name)}_s{seed}") or {}).get("steps"))
              not in (None, steps_of(name))}
    if stale:
        raise SystemExit(f"{args.out} holds runs of other step counts than this call's ({'; '.join(sorted(stale))} "
                         f"steps); use their --ntm-steps, or choose another --out")
    for seed in args.seeds:  # every row's first seed before any row's second
        for name in args.rows:
            steps = steps_of(name)
            if seed in {r["seed"] for r in state["results"].get(name, [])}:
                continue
            ckpt = args.out / f"{model_of(name)}_s{seed}"
            cpu = study.train_row(ckpt, model_of(name), steps, seed)
            if args.train_only:
                print(f"{name} seed {seed}: {steps} steps, {cpu:.0f} CPU s (trained; not evaluated: --train-only)",
                      flush=True)
                continue
            report = study.evaluate(ckpt, args.num_samples, steps=SAMPLE_STEPS.get(name, 4))
            state["results"].setdefault(name, []).append({"seed": seed, "steps": steps, "cpu_s": cpu, "eval": report})
            row = report["rows"][0]
            print(f"{name} seed {seed}: {steps} steps, {cpu:.0f} CPU s, {row['bits_per_dim']:.3f} bits/dim, "
                  f"Frechet {row['frechet']:.2f}, acc {row['prompt_accuracy']:.3f}", flush=True)
            save()
    if args.train_only:
        save()  # the folder's preset, for the call that evaluates
        return
    for name in args.rows:  # the guidance sweep, also of models trained by an earlier call
        for r in state["results"].get(name, []):
            ckpt = args.out / f"{model_of(name)}_s{r['seed']}"
            for t in args.temperature:
                for g in args.guidance:
                    if sweep_key(g, t) not in r.setdefault("guidance", {}):
                        r["guidance"][sweep_key(g, t)] = study.evaluate(ckpt, args.num_samples, g, t,
                                                                        SAMPLE_STEPS.get(name, 4))["rows"][0]
                        save()
    results = {k: list(v) for k, v in state["results"].items()}
    for other in args.merge:
        for name, runs in json.loads((other / "study.json").read_text())["results"].items():
            seen = {r["seed"] for r in results.get(name, [])}
            results.setdefault(name, []).extend(r for r in runs if r["seed"] not in seen)
    table = summarise(results, args.rows)
    if args.guidance:
        table += "\n" + summarise_guidance(results, args.rows, args.guidance, args.temperature)
    print(table)
    if args.table:
        args.table.write_text(table)
    if args.json:
        args.json.write_text(json.dumps({"rows": {k: ROWS[k][0] for k in args.rows}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
