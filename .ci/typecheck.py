"""`make typecheck`: mypy over the package as it is installed, and over the tests and benchmarks.

pyproject.toml installs the top-level folders export/, runtime/ and calib/ as ntm_edge.export,
ntm_edge.runtime and ntm_edge.calib ([tool.setuptools.package-dir]). mypy (like editors) resolves
imports by folder, and the editable install maps these names with an import hook it cannot read, so
this script builds .typecheck/, a tree of links laid out as the installed package, from that same
table, runs mypy on it (settings: [tool.mypy] in pyproject.toml), and prints the errors with the
paths of the repository's own files.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".typecheck"


def build_tree() -> dict[str, str]:
    """Link every package's modules into TREE at their installed place -> {tree prefix: repo folder}."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(TREE, ignore_errors=True)
    prefixes = {}
    for package, folder in package_dir.items():
        dest = TREE.joinpath(*package.split("."))
        dest.mkdir(parents=True, exist_ok=True)
        for source in sorted((ROOT / folder).glob("*.py")):
            (dest / source.name).symlink_to(source)
        prefixes[f"{dest.relative_to(ROOT)}/"] = f"{folder}/"
    return prefixes


def main() -> int:
    prefixes = build_tree()
    env = {**os.environ, "MYPYPATH": str(TREE)}
    runs = [["-p", "ntm_edge"], ["tests"], ["benchmarks", ".ci/typecheck.py"]]  # tests/ and benchmarks/ each have a conftest
    status = 0
    for args in runs:
        result = subprocess.run([sys.executable, "-m", "mypy", *args], cwd=ROOT, env=env, capture_output=True, text=True)
        out = result.stdout + result.stderr
        for prefix, folder in sorted(prefixes.items(), key=lambda kv: -len(kv[0])):
            out = re.sub(rf"(?m)^{re.escape(prefix)}", folder, out)
        print(out, end="")
        status = status or result.returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
