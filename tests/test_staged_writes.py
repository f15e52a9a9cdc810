"""Several files replaced as one save, sealed JSON records, and the output-directory check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ntm_edge.fileio import StagedWrites, is_sealed, output_dir_problem, seal


def test_a_failed_write_changes_none_of_the_files(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).write_text("old")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"), StagedWrites() as staged:
        staged.write(tmp_path / "a", lambda tmp: Path(tmp).write_text("new"))
        staged.write(tmp_path / "b", fail)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a": "old", "b": "old"}  # and no temporary


def test_all_files_are_replaced_once_all_are_written(tmp_path):
    (tmp_path / "a").write_text("old")
    with StagedWrites() as staged:
        tmp = staged.write(tmp_path / "a", lambda tmp: Path(tmp).write_text("new a"))
        assert (tmp_path / "a").read_text() == "old" and tmp.read_text() == "new a"  # not yet in place
        staged.write(tmp_path / "sub" / "b", lambda tmp: Path(tmp).write_text("new b"))
    assert (tmp_path / "a").read_text() == "new a" and (tmp_path / "sub" / "b").read_text() == "new b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "sub"]


def test_seal_detects_any_edit():
    record = seal({"step": 3, "weights_sha256": "ab" * 32, "nested": {"x": [1, 2.5]}})
    assert is_sealed(json.loads(json.dumps(record)))  # survives a JSON round trip
    assert not is_sealed({**record, "step": 4})
    assert not is_sealed({**record, "nested": {"x": [1, 2.5000001]}})
    assert not is_sealed({k: v for k, v in record.items() if k != "self_sha256"})


def test_output_dir_problems(tmp_path):
    assert output_dir_problem(tmp_path / "new" / "deeper") is None  # creatable: nothing created by the check
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    assert "exists and is not a directory" in output_dir_problem(tmp_path / "file")
    assert "is a file" in output_dir_problem(tmp_path / "file" / "run")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert "broken symbolic link" in output_dir_problem(tmp_path / "dangling")
    assert "needs about" in output_dir_problem(tmp_path, need_bytes=1 << 62)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "file"]  # the probe left nothing
