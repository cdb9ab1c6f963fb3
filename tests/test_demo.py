"""``make demo`` runs the main job on embedded defaults; it must keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import needs_fuse

ROOT = Path(__file__).resolve().parents[1]


@needs_fuse
def test_the_demo_runs_to_the_end() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tools.demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "demo ok" in result.stdout, result.stdout[-2000:]
