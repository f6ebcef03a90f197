"""A file as it was at a git revision, for the benchmarks that measure a change against its
baseline in the same run (``--baseline-ref``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def source_at(ref: str, path: str) -> str:
    """The text of ``path`` (relative to the repository's root) at revision ``ref``; raises
    ``subprocess.CalledProcessError`` (its ``stderr`` says why) for an unknown ref or path."""
    return subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{ref}:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
