"""`ntm-edge eval` and `ntm-edge compare` end to end on a trained tiny model."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image
from typer.testing import CliRunner

from ntm_edge.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def report(trained_tiny, tmp_path_factory, monkeypatch_module):
    out = tmp_path_factory.mktemp("eval") / "ntm.json"
    result = runner.invoke(app, ["eval", "--checkpoint", str(trained_tiny[0]), "--steps", "4", "--steps", "8",
                                 "--num-samples", "100", "--guidance", "2", "--label", "tiny NTM", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NTM_EDGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield mp
    mp.undo()


def test_eval_report(report, trained_tiny):
    r = json.loads(report.read_text())
    assert r["dataset"] == "digits" and r["objective"] == "ntm" and r["label"] == "tiny NTM"
    assert r["guidance"] == 2.0 and r["temperature"] == 1.0
    assert r["classifier_heldout_accuracy"] > 0.9
    assert [row["steps"] for row in r["rows"]] == [4, 8]
    row = r["rows"][0]
    assert row["bits_per_dim"] == pytest.approx(trained_tiny[1]["heldout"]["bits_per_dim"], rel=1e-6)
    assert 0.0 <= row["prompt_accuracy"] <= 1.0 and row["frechet"] > 0
    # the transporter's activity per level of the grid t_0 .. t_4 (issue 13); t = 1 is the identity
    assert [level["t"] for level in row["transporter"]][-1] == 1.0 and len(row["transporter"]) == 5
    assert row["transporter"][-1]["displacement"] == 0.0 and row["transporter"][-1]["logdet_per_dim"] == 0.0
    assert all(level["displacement"] >= 0.0 for level in row["transporter"])
    # the trajectory NLL per level t_0 .. t_4: it sums to the total, and the top level t_T = 1 is pure noise
    # scored by N(0, I) (f_T is the identity there): 0.5 log(2 pi e) nats per dim in expectation
    levels = row["level_nats_per_dim"]
    assert len(levels) == 5 and sum(levels) == pytest.approx(row["trajectory_nats_per_dim"], rel=1e-6)  # float32 terms
    assert levels[-1] == pytest.approx(0.5 * math.log(2 * math.pi * math.e), abs=0.03)
    assert "images_per_s" not in row  # speed is the bench's job (ntm-edge bench), not a quality figure
    # a (briefly) trained model is read as its prompts more often than chance, and sits closer to the
    # real data than noise does (noise is > 100 in this feature space, see test_metrics)
    assert row["prompt_accuracy"] > 0.3, row  # chance is 0.10; guidance 2 sharpens the prompt
    assert r["real_data"]["frechet"] < row["frechet"] < 100
    assert 0 < row["bits_per_dim_se"] < 0.5


def test_bits_per_dim_standard_error_predicts_the_spread_over_draws(trained_tiny):
    """With one image repeated, the images differ only by their draws (dequantisation, trajectory), which a
    seed renews: the spread of the mean over seeds is then what the standard error estimates (units: bits,
    and the 1/sqrt(N))."""
    import numpy as np

    from ntm_edge import NTM
    from ntm_edge.data import load_dataset
    from ntm_edge.evaluate import heldout_likelihood

    model = NTM.from_pretrained(trained_tiny[0])
    test = load_dataset("digits", "test", image_size=8)
    images, labels = np.repeat(test.images[:1], 128, axis=0), np.repeat(test.labels[:1], 128)
    runs = [heldout_likelihood(model, images, labels, seed=seed) for seed in range(64)]
    spread = float(np.std([r["bits_per_dim"] for r in runs], ddof=1))
    se = float(np.mean([r["bits_per_dim_se"] for r in runs]))
    # 64 draws estimate a std within about +-10%: bits, not nats (a factor 1.44), and the 1/sqrt(N)
    assert 0.75 < spread / se < 1.3, (spread, se)
    quarter = np.mean([heldout_likelihood(model, images[:32], labels[:32], seed=seed)["bits_per_dim_se"]
                       for seed in range(16)])
    assert 1.6 < quarter / se < 2.5  # a quarter of the images: twice the error



def test_heldout_images_scores_the_first_n_test_images(trained_tiny, tmp_path, monkeypatch_module):
    """--heldout-images N: the held-out bits/dim of the first N test images, what ``heldout_likelihood`` gives on
    them (a quick eval; the default is the whole split, test_eval_report). Fewer than 2 is refused before any
    work, in one line: the standard error needs two."""
    from ntm_edge import NTM
    from ntm_edge.data import load_dataset
    from ntm_edge.evaluate import heldout_likelihood

    out = tmp_path / "r.json"
    r = runner.invoke(app, ["eval", "--checkpoint", str(trained_tiny[0]), "--num-samples", "20", "--heldout-images", "50",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    row = json.loads(out.read_text())["rows"][0]
    test = load_dataset("digits", "test", image_size=8)
    assert row["num_images"] == 50 < len(test)
    want = heldout_likelihood(NTM.from_pretrained(trained_tiny[0]), test.images[:50], test.labels[:50], steps=4)
    assert row["bits_per_dim"] == pytest.approx(want["bits_per_dim"], rel=1e-6)
    bad = runner.invoke(app, ["eval", "--checkpoint", str(trained_tiny[0]), "--heldout-images", "1",
                              "--out", str(tmp_path / "bad.json")])
    assert bad.exit_code == 1 and bad.output.strip() == "error: --heldout-images must be at least 2, got 1"
    assert not (tmp_path / "bad.json").exists()

def test_compare_table_and_plot(report, tmp_path):
    table, plot = tmp_path / "t.md", tmp_path / "t.png"
    result = runner.invoke(app, ["compare", str(report), str(report), "--out", str(table), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    lines = table.read_text().splitlines()
    assert lines[0] == "| model | bits/dim | Frechet | prompt acc. |"
    # the same report twice is one model: merged, one row per step count
    assert sum("tiny NTM T=4" in line for line in lines) == 1 and "real held-out images" in lines[-1]
    assert sum("tiny NTM T=8" in line for line in lines) == 1
    assert Image.open(plot).size[0] > 300


def test_compare_rejects_a_non_report(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    result = runner.invoke(app, ["compare", str(bad)])
    assert result.exit_code == 1 and "not an `ntm-edge eval` report" in result.output


def test_compare_merges_one_model_split_across_evals(report):
    from ntm_edge.compare import merge_reports

    r = json.loads(report.read_text())
    first, second = {**r, "rows": r["rows"][1:]}, {**r, "rows": r["rows"][:1]}
    other = {**r, "label": "another model"}
    merged = merge_reports([first, second, other])
    assert [m["label"] for m in merged] == ["tiny NTM", "another model"]
    assert [row["steps"] for row in merged[0]["rows"]] == [4, 8]
