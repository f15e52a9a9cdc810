"""Property-based fuzz of the CLI's argument space (hypothesis) over `sample`, `run`, `audit` and
`export`, in-process through typer's CliRunner on the tiny exported model of test_export.

The values are fuzzed, not their types: every option gets a value of the type it declares (an int
for --num, a float for --guidance, a path for --out), drawn from the edge cases (0, negatives,
NaN, inf, 2^63, huge counts, missing files, directories, files where a directory is needed, wrong
suffixes, corrupt inputs) and from ordinary values. A value that typer itself cannot parse (text for
an int) is typer's usage error (exit 2), outside this property. For every example:

- exit status 0, or 1 with exactly one line on stderr, `error: ...`; never an escaped exception
  (a traceback) and never a Python warning (it would print to the user's stderr);
- exit 1 changes nothing in the working directory (no partial output, no temporary file); exit 0
  writes what it says: a grid in the format its suffix names, an array of every image, a bundle
  that loads;
- the checkpoint and the bundle given as inputs are never changed.

Examples are derandomized (the same ones on every run, for CI) and bounded; NTM_FUZZ_EXAMPLES
scales them for a longer local search.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from cli_checks import lines, no_traceback, temporaries, tree_digest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_export import make_tiny_bundle
from typer.testing import CliRunner

from ntm_edge.cli import app
from ntm_edge.runtime.bundle import load_bundle
from ntm_edge.validate import IMAGE_FORMATS

runner = CliRunner()
SCALE = float(os.environ.get("NTM_FUZZ_EXAMPLES", "1"))


def fuzz(examples: int):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt, bundle, _ = make_tiny_bundle(tmp_path_factory)
    return ckpt, bundle, (tree_digest(ckpt), tree_digest(bundle))


# -------------------------------------------------------------------------------------------------
# the working directory of one example: every kind of path an option may be given
# -------------------------------------------------------------------------------------------------


def workspace(tiny, with_bundle_copy: bool = False) -> Path:
    ws = Path(tempfile.mkdtemp(prefix="fuzz"))
    (ws / "dir").mkdir()
    (ws / "dir.png").mkdir()
    (ws / "file").write_text("a file, not a directory")
    (ws / "user").mkdir()
    (ws / "user" / "thesis.txt").write_text("precious")
    Image.new("L", (8, 8), 90).save(ws / "exists.png")
    rng = np.random.default_rng(0)
    np.save(ws / "exists.npy", rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8))
    np.save(ws / "one.npy", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    np.save(ws / "empty.npy", np.zeros((0, 8, 8, 1), np.uint8))
    np.save(ws / "float.npy", np.zeros((2, 8, 8, 1), np.float32))
    np.save(ws / "rank5.npy", np.zeros((1, 2, 8, 8, 1), np.uint8))
    (ws / "zero.npy").write_bytes(b"")
    (ws / "text.png").write_text("not an image")
    Image.new("L", (16, 16), 90).save(ws / "big.png")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(ws / "rgb.png")
    if with_bundle_copy:
        shutil.copytree(tiny[1], ws / "bundle_copy")
        shutil.copytree(tiny[1], ws / "bundle_extra")
        (ws / "bundle_extra" / "notes.txt").write_text("mine")
    return ws


def path_in(ws: Path, tiny, name: str) -> str:
    """A symbolic path choice -> a real path: CKPT and BUNDLE are the shared inputs."""
    ckpt, bundle = tiny[0], tiny[1]
    named = {"CKPT": ckpt, "CKPT/sub": ckpt / "sub", "CKPT/..": ckpt.parent, "BUNDLE": bundle, "MISSING": ws / "missing"}
    return str(named.get(name, ws / name))


def mostly(valid, invalid, bad: int = 1):
    """A valid value, except ``bad`` times in 10 an invalid one: with ten options per command, about a third
    of the examples are valid throughout (and succeed) while the rest probe one or two faults at a time."""
    valid = valid if isinstance(valid, st.SearchStrategy) else st.sampled_from(valid)
    invalid = invalid if isinstance(invalid, st.SearchStrategy) else st.sampled_from(invalid)
    return st.integers(0, 9).flatmap(lambda i: invalid if i >= 10 - bad else valid)


GRID = mostly(["out.png", "out.jpg", "out.JPEG", "out.webp", "out.bmp", "new/deeper/out.png", "exists.png"],
              ["out.txt", "noext", "dir", "dir.png", "file/x.png", "CKPT/sub"])
ARRAY = mostly([None, "a.npy", "new/a.npy", "exists.npy"], ["a.png", "dir", "file/x.npy"])
PROMPT = mostly(["3", "seven", "", " Digit 3 "], ["giraffe", "é", "x" * 300])
NUM = mostly(st.integers(1, 6), st.sampled_from([-3, 0, 10**13, 2**63]))
STEPS = mostly([1, 2, 4, 4, 8, 39], [-1, 0, 40, 10**6])
SEED = mostly([0, 1, 2**63 - 1], [-1, 2**63, 2**70])
GUIDANCE = mostly(st.sampled_from([0.0, 1.5]) | st.floats(0.0, 10.0),
                  st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 1e30]) | st.floats())
THREADS = mostly([None, -1, 0, 1, 2, 100_000], [-2, -100])
DEVICE = mostly([None, "cpu", "CPU"], ["cuda", "cuda:1", "tpu", "cuda:x"])
METHOD = mostly([None, "sequential", "jacobi"], ["newton"])
PROVIDER = mostly([None, "auto", "cpu"], ["cuda", "tensorrt", "bogus"])


def opt(name: str, value) -> list[str]:
    return [] if value is None else [name, str(value)]


# -------------------------------------------------------------------------------------------------
# the property
# -------------------------------------------------------------------------------------------------


def check(tiny, ws: Path, args: list[str], outputs: dict[str, str | None], verify=None):
    """Invoke and check the property; ``outputs``: option -> path the command may write on success;
    ``verify(result)``: what a success must have written (called before the workspace is removed)."""
    before = {p: tree_digest(p) for p in ws.iterdir()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = runner.invoke(app, args)
    try:
        no_traceback(r)
        assert not [str(w.message) for w in caught], [f"{w.category.__name__}: {w.message}" for w in caught]
        err = lines(r.stderr)
        event(f"exit {r.exit_code}")  # shown by pytest --hypothesis-show-statistics
        assert r.exit_code in (0, 1), (r.exit_code, r.output)
        if r.exit_code == 1:
            assert len(err) == 1 and err[0].startswith("error: "), r.output
            assert {p: tree_digest(p) for p in ws.iterdir()} == before, f"partial output after: {err[0]}"
        else:
            assert all(line.startswith("warning: ") for line in err), r.output
            assert not temporaries(ws)
            written = {Path(p).resolve() for p in outputs.values() if p}
            for p, digest in before.items():  # nothing else changed
                if p.resolve() not in written and not any(w.is_relative_to(p.resolve()) for w in written):
                    assert tree_digest(p) == digest, f"{p} changed"
            if verify is not None:
                verify(r)
        assert (tree_digest(tiny[0]), tree_digest(tiny[1])) == tiny[2], "an input checkpoint or bundle changed"
        return r
    finally:
        shutil.rmtree(ws, ignore_errors=True)


def images_written(out: str, array: str | None, num: int):
    def verify(r) -> None:
        with Image.open(out) as img:
            assert img.format == IMAGE_FORMATS[Path(out).suffix.lower()]
        if array:
            images = np.load(array)
            assert images.shape[0] == num and images.dtype == np.uint8

    return verify


# -------------------------------------------------------------------------------------------------
# the commands
# -------------------------------------------------------------------------------------------------


@fuzz(25)
@given(ckpt=mostly(["CKPT"], ["MISSING", "file", "BUNDLE", "dir"]), prompt=PROMPT, num=NUM, steps=STEPS, seed=SEED,
       guidance=GUIDANCE, out=GRID, array=ARRAY, final=mostly([None, "inverse", "denoiser", "inverse+score"], ["bogus"]),
       method=METHOD, device=DEVICE)
def test_fuzz_sample(tiny, ckpt, prompt, num, steps, seed, guidance, out, array, final, method, device):
    generate(tiny, ["sample", "--checkpoint", ckpt], prompt, num, steps, seed, guidance, out, array,
             [*opt("--final", final), *opt("--inverse-method", method), *opt("--device", device)])


@fuzz(25)
@given(bundle=mostly(["BUNDLE"], ["MISSING", "CKPT", "file", "dir"]), prompt=PROMPT, num=NUM, steps=STEPS, seed=SEED,
       guidance=GUIDANCE, out=GRID, array=ARRAY, threads=THREADS, final=mostly([None, "inverse", "denoiser"], ["bogus"]),
       method=METHOD, provider=PROVIDER, flags=st.lists(st.sampled_from(["--audit", "--unrolled"]), unique=True))
def test_fuzz_run(tiny, bundle, prompt, num, steps, seed, guidance, out, array, threads, final, method, provider, flags):
    generate(tiny, ["run", "--bundle", bundle], prompt, num, steps, seed, guidance, out, array,
             [*opt("--threads", threads), *opt("--final", final), *opt("--inverse-method", method),
              *opt("--provider", provider), *flags])


def generate(tiny, command, prompt, num, steps, seed, guidance, out, array, extra):
    """`sample` or `run` (``command``: name, source option, symbolic source) with the options they share."""
    ws = workspace(tiny)
    out_path, array_path = path_in(ws, tiny, out), array and path_in(ws, tiny, array)
    args = [*command[:2], path_in(ws, tiny, command[2]), "--prompt", prompt, "--num", str(num), "--steps", str(steps),
            "--seed", str(seed), "--guidance", str(guidance), "--out", out_path, *opt("--save-array", array_path), *extra]
    check(tiny, ws, args, {"--out": out_path, "--save-array": array_path}, images_written(out_path, array_path, num))


@fuzz(25)
@given(bundle=mostly(["BUNDLE"], ["MISSING", "CKPT", "file"]), prompt=PROMPT,
       image=mostly(["exists.npy", "exists.png", "one.npy", "rgb.png"],
                    ["big.png", "empty.npy", "float.npy", "rank5.npy", "zero.npy", "text.png", "dir", "MISSING", "file"]),
       steps=st.none() | STEPS, trajectories=mostly([1, 2, 3], [-1, 0]), seed=SEED, threads=THREADS, provider=PROVIDER)
def test_fuzz_audit(tiny, bundle, prompt, image, steps, trajectories, seed, threads, provider):
    ws = workspace(tiny)
    args = ["audit", "--bundle", path_in(ws, tiny, bundle), "--prompt", prompt, "--image", path_in(ws, tiny, image),
            *opt("--steps", steps), "--trajectories", str(trajectories), "--seed", str(seed), *opt("--threads", threads),
            *opt("--provider", provider)]
    check(tiny, ws, args, {}, lambda r: "bits/dim" in r.stdout or pytest.fail(r.stdout))


@fuzz(8)
@given(ckpt=mostly(["CKPT"], ["MISSING", "BUNDLE", "file"]),
       out=mostly(["new_bundle", "new/deeper/b", "dir", "bundle_copy"],  # half refused: a valid export costs seconds
                  ["user", "file", "bundle_extra", "CKPT", "CKPT/sub", "CKPT/..", "file/b"], bad=5),
       batch=mostly([1, 2, 4], [-1, 0, 10**13]), opset=mostly([14, 17, 23], [0, 13, 24, 28]), overwrite=st.booleans())
def test_fuzz_export(tiny, ckpt, out, batch, opset, overwrite):
    ws = workspace(tiny, with_bundle_copy=True)
    out_path = path_in(ws, tiny, out)
    args = ["export", "--checkpoint", path_in(ws, tiny, ckpt), "--out", out_path, "--batch", str(batch),
            "--opset", str(opset), "--no-parity", *(["--overwrite"] if overwrite else [])]
    check(tiny, ws, args, {"--out": out_path}, lambda r: load_bundle(out_path))  # a complete bundle that verifies
