"""Latency per stage and end to end, per backend and batch size, side by side in one run; and the
machine's peak, measured by a matmul probe in the same run.

    make bench                                   # all suites (this one: untrained `small`, full rounds)
    ntm-edge bench --out reports/cpu [--quick]   # this suite, plus report.md / report.png (ntm_edge.bench)

The setup (checkpoint, bundle, threads, --quick) comes from $NTM_BENCH_SETUP (written by
`ntm-edge bench`), else from $NTM_SMALL_CHECKPOINT (default: an untrained `small`, exported to a
temporary bundle) and $OMP_NUM_THREADS. Backends, stages and inputs: harness.py. Each benchmark
records its stage, backend, batch, FLOPs per image and peak probe in extra_info; the report divides.
Tests never assert on time.
"""

from __future__ import annotations

import time

import harness
import pytest

ORDER = [*harness.STAGES, *harness.END_TO_END]  # the report's row order


def pytest_generate_tests(metafunc):
    """(stage, batch, backend) in that nesting: the backends of one stage and batch run one after the
    other, so the ratios between them are taken seconds apart, under the same machine load."""
    if "backend" not in metafunc.fixturenames:
        return
    _, manifest = harness.session_setup()
    e2e = metafunc.function.__name__ == "test_end_to_end"
    stages = harness.END_TO_END if e2e else harness.STAGES
    backends = harness.backends(manifest)
    cases = [(stage, batch, b) for stage in stages for batch in harness.BATCHES + (harness.GPU_BATCHES if e2e else ())
             for b in backends if batch not in harness.GPU_BATCHES or b.kind == "graph"]
    metafunc.parametrize(("stage", "batch", "backend"), cases, ids=[f"{b.name}-b{batch}-{stage}" for stage, batch, b in cases])


@pytest.fixture(scope="session")
def bench():
    return harness.Harness(harness.session_setup()[0])


def _measure(benchmark, bench, fn, stage: str, label: str, info: dict) -> None:
    start = time.perf_counter()
    fn()  # warm-up: sessions, allocations, graph capture (in prepare), caches
    rounds = harness.rounds_for(time.perf_counter() - start, bench.setup.quick)
    benchmark.group = label
    benchmark.extra_info.update(stage=stage, stage_label=label, **info)
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0 if bench.setup.quick else 1, iterations=1)


@pytest.mark.parametrize("probe", list(harness.PROBES))
def test_peak(benchmark, bench, probe):
    fn, flops_per_call, info = bench.probe(probe)
    _measure(benchmark, bench, fn, "peak", f"matmul probe {probe}", {"probe": probe, "flops_per_call": flops_per_call, **info})


def _stage(benchmark, bench, backend, stage, batch, label):
    prepared = bench.prepare(backend, stage, batch)
    _measure(benchmark, bench, prepared.fn, stage, label,
             {"backend": backend.name, "batch": batch, "flops_per_image": prepared.flops_per_image,
              "peak": backend.peak, "order": ORDER.index(stage), **prepared.info})


def test_stage(benchmark, bench, backend, stage, batch):
    _stage(benchmark, bench, backend, stage, batch, harness.STAGES[stage])


def test_end_to_end(benchmark, bench, backend, stage, batch):
    _stage(benchmark, bench, backend, stage, batch, harness.END_TO_END[stage])
