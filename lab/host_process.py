"""Processes a test or benchmark starts on this host itself (not inside a lab node)."""

from __future__ import annotations

import subprocess
from typing import Any


def stop(proc: subprocess.Popen[Any], grace: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; by PID (``proc``), nothing else."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
