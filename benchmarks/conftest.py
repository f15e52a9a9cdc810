"""pytest setup for the benchmark suites.

- Collects ``bench_*.py`` here (``pytest benchmarks``); pytest's own ``python_files`` pattern only
  matches ``test_*.py``, and a file named on the command line is collected whatever its name.
- A suite appends lines to the session fixture ``summary``; they are printed after the run (after
  the tests, whatever ``-s`` says), so ratios measured side by side read as one table.
- For `ntm-edge bench`: one line per finished test in the file $NTM_BENCH_PROGRESS (its progress
  bar), and the machine (CPU model, cores, GPU, threads, versions) in pytest-benchmark's JSON.
"""

from __future__ import annotations

import os

import pytest

from ntm_edge.bench import PROGRESS_ENV
from ntm_edge.bench import machine_info as ntm_edge_machine

SUMMARY = pytest.StashKey[list[str]]()


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def summary(request) -> list[str]:
    """Lines to print at the end of the run."""
    return request.config.stash.setdefault(SUMMARY, [])


def pytest_terminal_summary(terminalreporter, config):
    lines = config.stash.get(SUMMARY, [])
    if lines:
        terminalreporter.write_sep("=", "benchmark summary")
        for line in lines:
            terminalreporter.write_line(line)


def _progress(line: str) -> None:
    path = os.environ.get(PROGRESS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def pytest_collection_finish(session):
    _progress(f"total {len(session.items)}")


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
        _progress(f"done {report.outcome} {report.nodeid}\t{reason}")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["ntm_edge"] = ntm_edge_machine()
