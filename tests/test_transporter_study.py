"""benchmarks/transporter_study.py, the reproducible NTM-against-ablation comparison of issue 13: its
equal-compute plan for both presets, its refusals, and one real (very short) row trained, evaluated and
tabulated end to end."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "transporter_study.py"


def study(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_small_plan_gives_every_row_the_ntms_cpu_seconds(tmp_path):
    out = tmp_path / "study"
    done = study("--preset", "small", "--ntm-steps", "1774", "--plan", "--out", str(out))
    assert done.returncode == 0, done.stderr
    commands = dict(re.findall(r"^(\w+): .*\n  (ntm-edge train .*)$", done.stdout, re.M))
    finetunes = {name: commands.pop(name) for name in ("s_ft", "s_idft", "s_ft_a0")}  # their FM runs: below
    assert list(commands) == ["s_ntm", "s_id", "s_ntm_x", "s_id_x", "s_fm", "s_ctx", "s_ntm2", "s_id2"]
    steps = {name: int(re.search(r"--steps (\d+)", cmd).group(1)) for name, cmd in commands.items()}
    # the per-step costs measured side by side: 1774 NTM, 2245 identity, 2269 FM, 1925 contextual NTM steps in
    # the same seconds
    assert steps == {"s_ntm": 1774, "s_id": 2245, "s_ntm_x": 1774, "s_id_x": 2245, "s_fm": 2269, "s_ctx": 1925,
                     "s_ntm2": 1774, "s_id2": 2245}
    for name, cmd in commands.items():
        assert "--dataset mnist5k --preset small --text-encoder minilm" in cmd
        grid = None if name == "s_fm" else "2" if name.endswith("2") else "4"
        assert re.findall(r"--pairwise-steps (\d+)", cmd) == ([grid] if grid else [])
        assert ("--transporter-blocks 0" in cmd) == name.startswith("s_id")
        assert ("--transporter-context" in cmd) == (name == "s_ctx")
    assert "s_fm2: FM, Euler at 2 steps (the s_fm model)\n  the model of s_fm, sampled at 2 steps" in done.stdout
    # the finetuned rows: FM for half the budget (its steps at FM's cost), then the finetune (at its own cost),
    # both from one FM run per seed
    fm = f"{out}/s_ft_sSEED_fm"
    for name, ft_steps, blocks in (("s_ft", 654, False), ("s_idft", 768, True), ("s_ft_a0", 887, False)):
        assert finetunes[name].endswith(f"--steps 1134 --checkpoint-every 100000 --eval-images 0 --seed SEED "
                                        f"--device cpu --out {fm} --objective fm --x0-mse-weight 0")
        ft = re.search(rf"^{name}: .*\n  .*\n  (ntm-edge train .*)$", done.stdout, re.M).group(1)
        assert f"--steps {ft_steps} " in ft and ft.endswith(f" --init-from {fm}") and "--pairwise-steps 4" in ft
        assert ("--align-weight 0" in ft) == (name == "s_ft_a0")
        assert ("--transporter-blocks 0" in ft) == blocks
    assert not out.exists()  # a plan trains and writes nothing


def test_refuses_rows_of_the_other_preset_in_one_line(tmp_path):
    done = study("--preset", "small", "--rows", "s_ntm", "ntm_0", "--plan", "--out", str(tmp_path / "s"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == ("transporter_study.py: error: rows ntm_0 are not rows of "
                                                    "--preset small (its rows: s_ntm, s_id, s_ntm_x, s_id_x, s_fm, s_ctx, "
                                                    "s_ntm2, s_id2, s_fm2, s_ft, s_idft, s_ft_a0)")
    done = study("--plan", "--calibrate", "--out", str(tmp_path / "c"))  # its step counts would not be the run's
    assert done.returncode == 2 and "--calibrate measures its own first" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "c").exists()


def test_one_tiny_row_end_to_end(tmp_path):
    out = tmp_path / "study"
    done = study("--ntm-steps", "3", "--seeds", "0", "--rows", "ntm_0", "--num-samples", "40", "--out", str(out),
                 "--table", str(tmp_path / "table.md"), "--guidance", "0", "--temperature", "1", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    state = json.loads((out / "study.json").read_text())
    assert state["preset"] == "tiny"
    (run,) = state["results"]["ntm_0"]
    row = run["eval"]["rows"][0]
    assert run["steps"] == 3 and run["seed"] == 0 and run["cpu_s"] > 0
    assert math.isfinite(row["bits_per_dim"]) and row["bits_per_dim"] > 0 and row["frechet"] > 0  # 3 steps: untrained
    assert len(row["transporter"]) == 5  # t_0..t_3 and t = 1 on the 4-step grid
    table = (tmp_path / "table.md").read_text()
    assert table.splitlines()[2].startswith("| NTM, NLL only (x0-MSE 0, tiny as-is) | 3 | ")
    # the sweep at two temperatures: guidance 0 at temperature 1 is the main eval again; at 0 every draw is zero
    assert set(run["guidance"]) == {"0", "0@t0"} and run["guidance"]["0"]["frechet"] == row["frechet"]
    assert run["guidance"]["0@t0"]["frechet"] != row["frechet"]
    assert "| guidance 0: Frechet / acc. | guidance 0, temperature 0: Frechet / acc. |" in table
    # the same folder cannot take the other preset's study
    again = study("--preset", "small", "--ntm-steps", "3", "--rows", "s_ntm", "--out", str(out))
    assert again.returncode == 1 and again.stderr.strip() == f"{out} holds a --preset tiny study; choose another --out"
    # nor a study of another budget: refused before any training, not mixed into the table
    more = study("--ntm-steps", "5", "--seeds", "0", "1", "--rows", "ntm_0", "--out", str(out))
    assert more.returncode == 1 and more.stderr.strip() == (f"{out} holds runs of other step counts than this call's "
                                                            "(ntm_0 seed 0: 3 steps); use their --ntm-steps, or "
                                                            "choose another --out")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["ntm_0_s0"]  # seed 1 was not trained
    assert json.loads((out / "ntm_0_s0.cpu_s").read_text()) == {"steps": 3, "cpu_s": run["cpu_s"]}
    # a model trained but not yet evaluated (a study stopped between the two) is checked by its own record
    (out / "study.json").write_text(json.dumps({**state, "results": {}}))
    more = study("--ntm-steps", "5", "--seeds", "0", "--rows", "ntm_0", "--out", str(out))
    assert more.returncode == 1 and "(ntm_0 seed 0: 3 steps)" in more.stderr
    # a record of seconds alone (written before it held the steps) is still read, and its model reused
    (out / "ntm_0_s0.cpu_s").write_text("12.5")
    same = study("--ntm-steps", "3", "--seeds", "0", "--rows", "ntm_0", "--num-samples", "40", "--out", str(out))
    assert same.returncode == 0, same.stdout + same.stderr
    assert json.loads((out / "study.json").read_text())["results"]["ntm_0"][0]["cpu_s"] == 12.5
