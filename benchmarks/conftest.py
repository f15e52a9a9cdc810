"""pytest setup for the benchmark suites.

- Collects ``bench_*.py`` here (``pytest benchmarks``); pytest's own ``python_files`` pattern only
  matches ``test_*.py``, and a file named on the command line is collected whatever its name.
- A suite appends lines to the session fixture ``summary``; they are printed after the run (after
  the tests, whatever ``-s`` says), so ratios measured side by side read as one table.
"""

from __future__ import annotations

import pytest

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
