"""`ntm-edge bench` end to end in --quick mode on the untrained tiny model (the suite runs in a
subprocess, through pytest-benchmark), and its checks before any work. Nothing here asserts on time:
only that every expected row is there with sane (positive, finite) figures and correct FLOP counts."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image
from typer.testing import CliRunner

from ntm_edge import flops
from ntm_edge.bench import FORMAT, MANIFEST, check_out_dir, is_report_dir
from ntm_edge.benchreport import load, peak_fraction
from ntm_edge.cli import app
from ntm_edge.config import get_preset
from ntm_edge.errors import ConfigError
from ntm_edge.fileio import publish_dir

runner = CliRunner()
BATCHES = (1, 8, 64)
STAGES = ("text_encoder", "predictor_step", "loop", "inverse_sequential", "inverse_jacobi", "inverse_gs_jacobi",
          "denoiser", "audit", "e2e_denoiser", "e2e_jacobi")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report"
    result = runner.invoke(app, ["bench", "--preset", "tiny", "--quick", "--threads", "1", "--out", str(out),
                                 "--note", "a test run"])
    assert result.exit_code == 0, result.output
    return out


def test_writes_report_files(report):
    assert {p.name for p in report.iterdir()} == {"report.md", "report.png", "benchmark.json", "pytest.log", MANIFEST}
    manifest = json.loads((report / MANIFEST).read_text())
    assert manifest["format"] == FORMAT and manifest["setup"]["quick"] and manifest["preset"] == "tiny"
    assert manifest["command"] == f"ntm-edge bench --preset tiny --quick --threads 1 --out {report}"
    assert Image.open(report / "report.png").size[0] > 600
    assert not list(report.parent.glob(".*")), "temporary directories left behind"


def test_rows_are_complete_and_sane(report):
    rows, peaks, probes, machine = load(report / "benchmark.json")
    got = {(r.stage, r.backend, r.batch) for r in rows}
    for stage in STAGES:
        for batch in BATCHES:
            assert (stage, "torch", batch) in got, (stage, batch)
            if stage != "inverse_gs_jacobi":  # the runtime has no GS-Jacobi (yet)
                assert (stage, "ort-cpu-fp32", batch) in got, (stage, batch)
    assert peaks["cpu-fp32"] == max(g for _, g in probes.values()) and math.isfinite(peaks["cpu-fp32"])
    assert set(probes) == {"cpu-fp32-torch", "cpu-fp32-onnxruntime"} or len(probes) > 2  # CUDA probes where CUDA exists
    cfg = get_preset("tiny")
    expected = {"text_encoder": 0, "predictor_step": flops.predictor_step(cfg), "loop": flops.sampler_loop(cfg, 4),
                "inverse_sequential": flops.inverse_sequential(cfg), "audit": flops.audit(cfg, 4)}
    for r in rows:
        assert r.median_s > 0 and math.isfinite(r.median_s) and r.rounds == 3
        assert r.images_per_s > 0 and math.isfinite(r.images_per_s)
        if r.stage in expected:
            assert r.flops_per_image == expected[r.stage], r
        if r.stage == "inverse_jacobi":
            assert r.flops_per_image == flops.inverse_jacobi(cfg, flops.jacobi_work(cfg, r.info["passes"]))
            assert min(r.info["passes"]) > 1  # the perturbed transporter is not the identity
        if r.flops_per_image:
            frac = peak_fraction(r, peaks)
            assert frac is not None and frac > 0 and math.isfinite(frac)
    m = machine["ntm_edge"]
    assert m["cpu_model"] and m["logical_cores"] >= 1 and m["torch_threads"] == 1 and "torch" in m["versions"]


def test_report_markdown(report):
    text = (report / "report.md").read_text()
    assert text.startswith("# ntm-edge bench report\n\na test run\n")
    ratios = text.index("## Speed against torch eager")
    assert ratios < text.index("## Per stage")  # the side-by-side ratios lead
    assert "| stage | batch | torch ms | ort-cpu-fp32 |" in text
    for label in ("text encoder", "predictor step", "4-step loop", "inverse (sequential)", "inverse (Jacobi)",
                  "denoiser", "audit (exact NLL)", "end to end: 4 steps + denoiser"):
        assert f"| {label} | 64 |" in text, label
    assert "UNTRAINED `tiny`" in text and "- **Machine**: CPU " in text and "- **Threads**: 1 " in text
    assert "needs CUDA" in text or "torch-cuda-bf16 |" in text  # skipped with its reason, or timed


def test_replaces_only_a_report(report, tmp_path):
    check_out_dir(report)  # an earlier report may be replaced
    check_out_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an ntm-edge bench report"):
        check_out_dir(other)
    # publishing over an earlier report swaps it whole
    old, new = tmp_path / "old", tmp_path / "work"
    for d, text in ((old, "old"), (new, "new")):
        d.mkdir()
        (d / MANIFEST).write_text(json.dumps({"format": FORMAT}))
        (d / "report.md").write_text(text)
    assert is_report_dir(old)
    publish_dir(new, old)
    assert (old / "report.md").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "old", "other"]


def test_refuses_a_non_report_out_in_one_line(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for out in (other, other / "notes.txt"):
        result = runner.invoke(app, ["bench", "--quick", "--out", str(out)])
        assert result.exit_code == 1
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: --out {out} "), result.output
    assert [p.name for p in other.iterdir()] == ["notes.txt"] and (other / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no work started


def test_bad_inputs_fail_before_work(tmp_path):
    for args, message in ((["--preset", "huge"], "unknown preset 'huge'"),
                          (["--checkpoint", str(tmp_path / "nope")], "does not exist"),
                          (["--bundle", str(tmp_path / "nope")], "does not exist"),
                          (["--threads", "0"], "--threads must be at least 1")):
        result = runner.invoke(app, ["bench", "--quick", "--out", str(tmp_path / "r"), *args])
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert message in result.output, result.output
    assert not list(tmp_path.iterdir())
