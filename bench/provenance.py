"""Where a benchmark's figures came from: the commit that bench/RESULTS.md records with each."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def commit() -> str:
    """``RECSERVE_COMMIT`` when set (the GPU machine's copy of the tree has no .git), else the
    checkout's short HEAD, else ``"unknown"``."""
    given = os.environ.get("RECSERVE_COMMIT", "").strip()
    if given:
        return given
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "-q", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"
