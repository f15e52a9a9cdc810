"""benchmarks/seed_table.py: the README's few-step tables, rebuilt from the committed eval records."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "seed_table.py"
RECORDS = ROOT / "benchmarks" / "reports" / "default_model"


def table(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_the_three_step_table_from_the_committed_records():
    done = table("--steps", "3", f"NTM={RECORDS}/pw3-nll-s[01]-T3-*.json", f"id={RECORDS}/pw3-id-s[01]-T3-*.json")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    head = cells(lines[0])
    col = head.index("g 0, tau 0.7")
    rows = {(c[0], c[1]): c for c in map(cells, lines[2:]) if len(c) > 2 and c[1] != "---"}
    frechet = {}
    for run in ("pw3-nll-s0", "pw3-nll-s1"):  # each run's cell is its own record's figures
        record = json.loads((RECORDS / f"{run}-T3-g0-t0.7-n2000.json").read_text())["rows"][0]
        frechet[run] = record["frechet"]
        assert rows[("NTM", run)][col] == f"{record['frechet']:.2f} / {record['prompt_accuracy']:.3f}"
        assert rows[("NTM", run)][2] == f"{record['bits_per_dim']:.3f}"
        assert re.fullmatch(r"(0\.\d{3} \([+-]\d\.\d\d\)( / )?){3}", rows[("NTM", run)][-1])  # t_0, t_1, t_2 moved
    assert rows[("id", "pw3-id-s0")][-1] == "-"  # an identity transporter does not move
    mean = rows[("NTM", "2")]  # the summary: mean (range) over the runs
    f = list(frechet.values())
    assert mean[col].startswith(f"{statistics.mean(f):.2f} ({max(f) - min(f):.2f}) / ")
    # each run at its best: the lowest Frechet over its own records, and their mean (range)
    tops = []
    for run in ("pw3-nll-s0", "pw3-nll-s1"):
        records = [json.loads(p.read_text()) for p in RECORDS.glob(f"{run}-T3-*-n2000.json")]
        top = min(records, key=lambda r: r["rows"][0]["frechet"])
        tops.append(top["rows"][0]["frechet"])
        assert rows[("NTM", run)][-2] == (f"{top['rows'][0]['frechet']:.2f} / {top['rows'][0]['prompt_accuracy']:.3f} "
                                          f"(g {top['guidance']:g}, tau {top['temperature']:g})")
    assert head[-2] == "at its best" and cells(lines[lines.index("") + 1])[-1] == "each run at its best"
    assert mean[-1].startswith(f"{statistics.mean(tops):.2f} ({max(tops) - min(tops):.2f}) / ")
    assert all(t <= fr for t, fr in zip(tops, f, strict=True))  # a run's best is at most its tau-0.7 figure


def test_counts_only_the_asked_steps_and_refuses_a_second_record_of_one_setting(tmp_path):
    for name in ("pw3-nll-s0-T3-g0-t0.7-n2000.json", "pw3-nll-s0-T3-g0-t0.8-n2000.json"):
        shutil.copy(RECORDS / name, tmp_path / name)
    done = table("--steps", "4", f"NTM={tmp_path}/*.json")  # 3-step records only: none at 4 steps
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith(
        f"NTM: no eval record at 4 steps and 2000 samples matches {tmp_path}/*.json")
    done = table("--steps", "3", f"NTM={tmp_path}/*.json")
    assert done.returncode == 0 and "| g 0, tau 0.8 | g 0, tau 0.7 |" in done.stdout.splitlines()[0]
    shutil.copy(RECORDS / "pw3-nll-s0-T3-g0-t0.7-n2000.json", tmp_path / "pw3-nll-s0-T3-g0-t0.7-again.json")
    done = table("--steps", "3", f"NTM={tmp_path}/*.json")
    assert done.returncode == 1 and done.stderr.strip() == (
        f"{tmp_path}/pw3-nll-s0-T3-g0-t0.7-n2000.json: a second record of pw3-nll-s0 at guidance 0, temperature 0.7")
    (tmp_path / "pw3-nll-s9-T3-g0-broken.json").write_text("{}")
    done = table("--steps", "3", f"NTM={tmp_path}/pw3-nll-s9*.json")
    assert done.returncode == 1 and "not an `ntm-edge eval` record" in done.stderr


def test_reads_records_written_before_temperatures_existed():
    """The 4-step records of the third pass predate `eval --temperature`: they sampled at temperature 1."""
    old = json.loads((RECORDS / "pw4-nll-s0-2x-g0.25-n2000.json").read_text())
    assert "temperature" not in old
    done = table("--steps", "4", f"NTM={RECORDS}/pw4-nll-s0-2x-g0.25-n2000.json",
                 f"NTM t={RECORDS}/pw4-nll-s0-2x-g0.1-t0.9-n2000.json")
    assert done.returncode == 0, done.stderr
    head, row = cells(done.stdout.splitlines()[0]), cells(done.stdout.splitlines()[2])
    assert {"g 0.25, tau 1", "g 0.1, tau 0.9"} <= set(head)
    assert row[head.index("g 0.25, tau 1")] == f"{old['rows'][0]['frechet']:.2f} / {old['rows'][0]['prompt_accuracy']:.3f}"


def test_the_trajectory_nll_per_level():
    """The level table: each model's terms t_0 .. t_T from its records, and the difference of the means;
    records written before `eval` reported them (seeds 0-2) leave their model out of it."""
    done = table("--steps", "3", f"NTM={RECORDS}/pw3-nll-s3-T3-*.json", f"id={RECORDS}/pw3-id-s3-T3-*.json",
                 f"old={RECORDS}/pw3-nll-s0-T3-*.json")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    start = lines.index("| model | runs | t_0 | t_1 | t_2 | t_3 (N(0, I) top) |")
    rows = {c[0]: c for c in map(cells, lines[start + 2:])}
    assert set(rows) == {"NTM", "id", "id minus NTM"}  # "old" has no such figures
    levels = {}
    for label, run in (("NTM", "pw3-nll-s3"), ("id", "pw3-id-s3")):
        row = json.loads((RECORDS / f"{run}-T3-g0-t0.8-n2000.json").read_text())["rows"][0]
        levels[label] = row["level_nats_per_dim"]
        assert sum(levels[label]) == pytest.approx(row["trajectory_nats_per_dim"], rel=1e-6)  # float32 terms
        assert rows[label][2:] == [f"{v:+.4f} (0.0000)" for v in levels[label]]  # one run: no spread
    assert rows["id minus NTM"][2:] == [f"{b - a:+.4f}" for a, b in zip(levels["NTM"], levels["id"], strict=True)]
