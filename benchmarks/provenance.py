"""Which code a benchmark measured: the commit, marked `-dirty` when the tree had changes."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit() -> str:
    return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip() or "unknown"
