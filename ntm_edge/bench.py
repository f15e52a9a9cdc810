"""`ntm-edge bench`: the latency suite (benchmarks/bench_stages.py) run through pytest-benchmark, and
a report a user can read (benchreport.py).

1. Check the options and the output directory before any work: ``--out`` must be absent, empty, or a
   bench report written earlier (its ``bench.json`` says so); nothing else is ever replaced.
2. Set up what the suite times (``prepare_setup``): the checkpoint (or an untrained preset model, with
   an untrained denoiser) and its ONNX bundle (exported into a temporary directory unless given).
3. Run the suite in a subprocess of this interpreter, with a progress bar fed by the suite's
   conftest, and keep pytest-benchmark's JSON and pytest's log.
4. Write report.md, report.png and bench.json (the manifest that marks the directory as a report)
   into a temporary directory next to ``--out``, then rename it into place.

The suite reads its setup from the JSON file named by $NTM_BENCH_SETUP; without it (`make bench`) it
prepares one itself (``setup_from_env``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import ConfigError, NtmError
from .fileio import atomic_write_text, make_temp_dir, publish_dir

FORMAT, FORMAT_VERSION, MANIFEST = "ntm-edge-bench-report", 1, "bench.json"
JSON, LOG, REPORT, PLOT = "benchmark.json", "pytest.log", "report.md", "report.png"
SUITES = ("bench_stages.py",)  # in benchmarks/ of the source checkout
SETUP_ENV, PROGRESS_ENV = "NTM_BENCH_SETUP", "NTM_BENCH_PROGRESS"
PERTURB = 0.03  # std of the noise added to an untrained transporter (a fresh one is the identity)
CLASS_NAMES = tuple("0123456789")  # the untrained model's prompts


@dataclass(frozen=True)
class BenchSetup:
    """What the suite times: paths, how the model came to be, the thread count and the round budget."""

    checkpoint: str
    bundle: str
    model: str  # a sentence for the report: which weights these are
    quick: bool = False
    threads: int = 1
    exported: bool = False  # the bundle was exported by the bench (into a temporary directory)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> BenchSetup:
        return cls(**json.loads(text))


# -- checks before any work ------------------------------------------------------------------------


def is_report_dir(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(out: Path) -> None:
    """``out`` may be absent, an empty directory or an earlier bench report; anything else is refused."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_report_dir(out):
        raise ConfigError(f"--out {out} exists and is not an ntm-edge bench report (no {MANIFEST} of one); "
                          f"choose a new directory, an empty one or an earlier report")


def suite_dir() -> Path:
    """benchmarks/ of the source checkout this package runs from (the suites are not installed)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks"
    if not all((path / s).is_file() for s in SUITES):
        raise ConfigError(f"the benchmark suites are not at {path}: `ntm-edge bench` runs from a source checkout "
                          f"(pip install -e .)")
    return path


def check_sources(checkpoint, bundle, preset: str) -> None:
    """Fail early, with one line, on a checkpoint or bundle that cannot be read or do not match."""
    from .checkpoint import load_config, load_info
    from .config import get_preset
    from .runtime.bundle import load_bundle

    get_preset(preset)
    if checkpoint is not None and load_config(checkpoint).transporter.context:
        raise ConfigError(f"--checkpoint {checkpoint} has a contextual transporter (--transporter-context): `bench` "
                          f"times the u-space sampler's stages, which it does not have; time it with "
                          f"benchmarks/sampling_speed.py")
    if bundle is None:
        return
    b = load_bundle(bundle)
    if b.config.transporter.context:
        raise ConfigError(f"--bundle {bundle} has a contextual transporter (--transporter-context): `bench` times the "
                          f"u-space sampler's stages, which it does not have; time it with `ntm-edge run` or "
                          f"benchmarks/sampling_speed.py")
    source = b.manifest.get("source", {})
    if checkpoint is None:
        if not source.get("checkpoint") or not Path(source["checkpoint"]).is_dir():
            raise ConfigError(f"--bundle {bundle}: the checkpoint it was exported from ({source.get('checkpoint')}) "
                              f"is not here; pass it with --checkpoint (the torch rows time it)")
        checkpoint = source["checkpoint"]
    if load_info(checkpoint).get("weights_sha256") != source.get("weights_sha256"):
        raise ConfigError(f"--bundle {bundle} was not exported from the checkpoint {checkpoint} (other weights)")


# -- the setup -------------------------------------------------------------------------------------


def untrained_checkpoint(preset: str, path: Path, seed: int = 0) -> Path:
    """An untrained ``preset`` model (1 channel, prompts 0-9) with an untrained denoiser, saved at ``path``.
    Its transporter weights get N(0, PERTURB^2) noise: a fresh transporter is the identity, which Jacobi
    inverts in one pass; speed does not depend on the weights otherwise."""
    import torch

    from .config import get_preset
    from .denoiser import Denoiser, denoiser_config, save_denoiser
    from .model import NTM

    torch.manual_seed(seed)
    model = NTM(get_preset(preset).with_data(1, CLASS_NAMES)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.transporter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * PERTURB)
    model.save_pretrained(path)
    den = Denoiser(denoiser_config(model))
    save_denoiser(den.eval(), path, {"trained": None, "note": "untrained, for timing only"})
    return Path(path)


def prepare_setup(work: Path, checkpoint=None, bundle=None, preset: str = "small", quick: bool = False,
                  threads: int = 1, log=print) -> BenchSetup:
    """The checkpoint (``work``/model when none is given) and its bundle (``work``/bundle when none is
    given; exported without the parity check, which `ntm-edge export` runs) -> BenchSetup."""
    from .checkpoint import load_info
    from .runtime.bundle import load_bundle

    if checkpoint is None and bundle is not None:
        checkpoint = load_bundle(bundle).manifest["source"]["checkpoint"]
    if checkpoint is None:
        checkpoint = untrained_checkpoint(preset, work / "model")
        what = (f"UNTRAINED `{preset}` preset (transporter weights + N(0, {PERTURB}^2), so that Jacobi needs "
                f"more than one pass) and an untrained denoiser: the timings hold for any weights, the Jacobi "
                f"pass counts do not")
    else:
        info = load_info(checkpoint)
        what = f"checkpoint {checkpoint} (step {info.get('step')}, dataset {info.get('dataset')})"
    if bundle is None:
        from .export import export_bundle

        log("exporting the bundle the onnxruntime rows time ...")
        bundle = work / "bundle"
        export_bundle(checkpoint, bundle, batch=64, parity=False, log=lambda *_: None)
        return BenchSetup(str(checkpoint), str(bundle), what, quick, threads, exported=True)
    return BenchSetup(str(checkpoint), str(bundle), what, quick, threads)


def setup_from_env() -> tuple[BenchSetup, tempfile.TemporaryDirectory | None]:
    """The suite's setup: the file $NTM_BENCH_SETUP names, else one prepared now (`make bench`): the
    checkpoint $NTM_SMALL_CHECKPOINT or an untrained `small`, threads $OMP_NUM_THREADS (else 1), full
    rounds. Returns the temporary directory to keep alive, if one was made."""
    path = os.environ.get(SETUP_ENV)
    if path:
        return BenchSetup.from_json(Path(path).read_text()), None
    tmp = tempfile.TemporaryDirectory(prefix="ntm-bench-")
    threads = int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    setup = prepare_setup(Path(tmp.name), os.environ.get("NTM_SMALL_CHECKPOINT") or None, threads=threads)
    return setup, tmp


# -- the machine -----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model and cores, GPU, thread count and library versions (recorded by the suite in its JSON)."""
    import numpy
    import onnxruntime
    import pytest_benchmark
    import torch

    gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "cpu_model": cpu_model(), "logical_cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(), "gpu": gpu, "cuda": torch.version.cuda,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "versions": {"ntm_edge": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
                     "pytest_benchmark": pytest_benchmark.__version__},
        "platform": platform.platform(),
    }


# -- the command -----------------------------------------------------------------------------------


def run_bench(out, checkpoint=None, bundle=None, preset: str = "small", quick: bool = False, threads: int | None = None,
              note: str = "", progress: bool = True, log=print) -> dict:
    """`ntm-edge bench`: run the suite, write the report into ``out``; returns the manifest."""
    from .benchreport import write_report

    out = Path(out)
    check_out_dir(out)
    suites = suite_dir()
    if threads is not None and threads < 1:
        raise ConfigError("--threads must be at least 1")
    threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or os.cpu_count() or 1
    check_sources(checkpoint, bundle, preset)
    work = make_temp_dir(out.parent, out.name)
    try:
        with tempfile.TemporaryDirectory(prefix="ntm-bench-") as tmp:
            setup = prepare_setup(Path(tmp), checkpoint, bundle, preset, quick, threads, log)
            atomic_write_text(work / "setup.json", setup.to_json())
            start = time.time()
            skipped = _run_suite(suites, work, threads, progress, log)
            seconds = time.time() - start
        (work / "setup.json").unlink()
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "command": _command(out, checkpoint, bundle, preset, quick, threads),
                    "setup": dataclasses.asdict(setup), "preset": preset if checkpoint is None and bundle is None else None,
                    "note": note, "suite_seconds": round(seconds, 1)}
        write_report(work, manifest, skipped)
        manifest["files"] = sorted(p.name for p in work.iterdir() if p.name != MANIFEST)
        atomic_write_text(work / MANIFEST, json.dumps(manifest, indent=2))
        publish_dir(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {out / REPORT}, {out / PLOT} and {out / JSON}")
    return manifest


def _command(out, checkpoint, bundle, preset, quick, threads) -> str:
    """The command line that reproduces this report."""
    parts = ["ntm-edge bench"]
    parts += [f"--checkpoint {checkpoint}"] if checkpoint else []
    parts += [f"--bundle {bundle}"] if bundle else []
    parts += [f"--preset {preset}"] if checkpoint is None and bundle is None and preset != "small" else []
    parts += ["--quick"] if quick else []
    return " ".join([*parts, f"--threads {threads}", f"--out {out}"])


def _run_suite(suites: Path, work: Path, threads: int, progress: bool, log) -> dict[str, list[str]]:
    """pytest on the suites in a subprocess; its output goes to ``work``/pytest.log, its progress events
    (conftest.py: one line per test) to a file that this process follows. Returns the skips: reason ->
    the backends (or probes) skipped for it."""
    events = work / ".progress"
    # a pytest-xdist worker's variables (when bench runs inside one, as under `make test`) would make the
    # child pytest act as a worker, and pytest-benchmark leaves the JSON to a controller that is not there
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env = {**inherited, SETUP_ENV: str(work / "setup.json"), PROGRESS_ENV: str(events), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "pytest", *[str(suites / s) for s in SUITES], "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={work / JSON}", "--benchmark-columns=median,iqr,rounds"]
    with open(work / LOG, "w") as out, _bar(progress) as bar:
        task = bar.add_task("bench", total=None)
        proc = subprocess.Popen(cmd, cwd=suites.parent, env=env, stdout=out, stderr=subprocess.STDOUT)
        done = last = 0
        while proc.poll() is None:
            time.sleep(0.3)
            total, done = _read_events(events)
            bar.update(task, total=total, completed=done)
            if not progress and total and done * 10 // total > last:
                last = done * 10 // total
                log(f"bench: {done}/{total} benchmarks")
    skipped = _skips(events)
    events.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = (work / LOG).read_text().splitlines()[-15:]
        for line in tail:
            log(f"  | {line}")
        raise NtmError(f"the benchmark suite failed (pytest exit status {proc.returncode}; its last lines are above)")
    if not (work / JSON).is_file():
        raise NtmError(f"the benchmark suite passed but wrote no {JSON} (see {work / LOG})")
    return skipped


def _read_events(path: Path) -> tuple[int | None, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None, 0
    total = next((int(line.split()[1]) for line in lines if line.startswith("total ")), None)
    return total, sum(line.startswith("done ") for line in lines)


def _skips(path: Path) -> dict[str, list[str]]:
    """'done skipped NODEID<TAB>REASON' events -> reason -> backend (or probe) names, from the node ids
    ``test_stage[BACKEND-bBATCH-STAGE]`` and ``test_peak[PROBE]``."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        if not line.startswith("done skipped "):
            continue
        node, _, reason = line.removeprefix("done skipped ").partition("\t")
        m = re.search(r"\[(.+)-b\d+-\w+\]$", node) or re.search(r"test_peak\[(.+)\]$", node)
        name = m.group(1) if m else node
        out.setdefault(reason.removeprefix("Skipped: "), []).append(("matmul probe " if "test_peak" in node else "") + name)
    return out


def _bar(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled)
