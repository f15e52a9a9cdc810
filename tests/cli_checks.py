"""Assertions shared by the CLI fault tests and the CLI fuzz test (not a test module)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def flat_help(output: str) -> str:
    """A --help page as one line of words: rich's panel borders and line wrapping removed."""
    return " ".join(output.replace("│", " ").replace("╭", " ").replace("╰", " ").replace("─", " ").split())


def no_traceback(result) -> None:
    """The command ended through the CLI (typer.Exit or a normal return), not by an escaped exception."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"escaped {result.exception!r}\n{result.output}")
    assert "Traceback" not in result.output


def one_line_error(result, contains: str = "") -> str:
    """Exit status 1, and exactly one line on stderr: 'error: ...' (containing ``contains``)."""
    no_traceback(result)
    err = lines(result.stderr)
    assert result.exit_code == 1 and len(err) == 1 and err[0].startswith("error: "), (result.exit_code, result.output)
    assert contains in err[0], err[0]
    return err[0]


def tree_digest(root: Path) -> str:
    """sha256 over the names, kinds and contents of everything under ``root`` (and root itself)."""
    h = hashlib.sha256()
    root = Path(root)
    if not root.exists():
        return "absent"
    if root.is_file():
        return hashlib.sha256(root.read_bytes()).hexdigest()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        h.update(b"d" if p.is_dir() else p.read_bytes())
    return h.hexdigest()


def temporaries(root: Path) -> list[Path]:
    """What an interrupted atomic write would leave: ``.<name>.<pid>.<random>.tmp`` entries."""
    return [p for p in Path(root).rglob(".*.tmp")]
