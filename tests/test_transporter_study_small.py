"""benchmarks/transporter_study.py on the `small` preset (mnist5k, MiniLM prompts), trained for real (a few
steps): the rows that share one flow-matching model. A module of its own, apart from the plan and the `tiny`
row (tests/test_transporter_study.py), so that the suite's two workers can run the two halves at once."""

from __future__ import annotations

import json

from test_transporter_study import study


def test_a_small_study_shares_one_fm_model_between_its_4_and_2_step_rows(tmp_path):
    """s_fm2 samples s_fm's model at 2 steps: one training (one folder, the same CPU seconds in both rows),
    two evals (4 and 2 steps). Also the first run of a fresh small study (it was once refused as 'tiny')."""
    out = tmp_path / "study"
    done = study("--preset", "small", "--ntm-steps", "2", "--seeds", "0", "--rows", "s_fm", "s_fm2",
                 "--num-samples", "40", "--heldout-images", "50", "--out", str(out), "--table", str(tmp_path / "table.md"))
    assert done.returncode == 0, done.stdout + done.stderr
    state = json.loads((out / "study.json").read_text())
    assert state["preset"] == "small"
    (fm4,), (fm2,) = state["results"]["s_fm"], state["results"]["s_fm2"]
    assert fm4["cpu_s"] == fm2["cpu_s"] > 0 and fm4["steps"] == fm2["steps"] == 3  # 2 x 2269 / 1774
    assert fm4["eval"]["rows"][0]["steps"] == 4 and fm2["eval"]["rows"][0]["steps"] == 2
    assert fm4["eval"]["rows"][0]["num_images"] == fm2["eval"]["rows"][0]["num_images"] == 50  # --heldout-images
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["s_fm_s0"]  # trained once
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[2].startswith("| FM, Euler, at the NTM's CPU seconds | 3 | ") and "| 4 | - |" in table[2]
    assert table[3].startswith("| FM, Euler at 2 steps (the s_fm model) | 3 | ") and "| 2 | - |" in table[3]


def test_the_finetuned_rows_share_one_fm_run_and_count_its_seconds(tmp_path):
    """s_ft and s_idft finetune one FM model per seed (trained once, by the first of them), and each row's
    CPU seconds are the FM run's plus its own finetune's. With --train-only: trained, recorded, not evaluated."""
    out = tmp_path / "study"
    done = study("--preset", "small", "--ntm-steps", "4", "--seeds", "0", "--rows", "s_ft", "s_idft", "--train-only",
                 "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["s_ft_s0", "s_ft_s0_fm", "s_idft_s0"]
    fm_cpu = float((out / "s_ft_s0_fm.cpu_s").read_text())
    for name, ft_steps in (("s_ft", 1), ("s_idft", 2)):  # the other half of 4 NTM steps: 2 x 1309 / 1774, 2 x 1536 / 1774
        ckpt = out / f"{name}_s0"
        info = json.loads((ckpt / "checkpoint.json").read_text())
        assert info["step"] == ft_steps and info["objective"] == "ntm"
        record = json.loads((out / f"{name}_s0.cpu_s").read_text())  # what the row's result takes when evaluated
        assert record["steps"] == 4 and record["cpu_s"] > fm_cpu > 0
        assert f"{name} seed 0: 4 steps, " in done.stdout and not list(out.glob(f"{name}_s0_eval*"))
    assert json.loads((out / "study.json").read_text())["results"] == {}  # nothing evaluated
    assert json.loads((out / "s_ft_s0_fm" / "checkpoint.json").read_text())["step"] == 3  # 2 x 2269 / 1774
    assert "finetuning from" in (out / "s_idft_s0.log").read_text()
    again = study("--preset", "small", "--plan", "--train-only", "--out", str(tmp_path / "p"))
    assert again.returncode == 2 and "choose one" in again.stderr.strip().splitlines()[-1]
