"""Shared by the benchmark tests: one --quick run of a benchmark on the tiny base."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

QuickRun = Callable[..., tuple[subprocess.CompletedProcess[str], dict[str, Any]]]


@pytest.fixture
def run_quick_on_tiny(tiny_model_dir: Path, tmp_path: Path) -> QuickRun:
    """Run ``python SCRIPT --quick *extra`` on the tiny base with a private cache.

    Returns the finished process (which must have exited 0) and its ``--json`` result.
    """

    def run(
        script: Path, *extra: str, timeout: float = 600
    ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
        out = tmp_path / "x.json"
        argv = ["--quick", *extra, "--base", str(tiny_model_dir)]
        argv += ["--cache-dir", str(tmp_path / "cache"), "--json", str(out)]
        proc = subprocess.run(
            [sys.executable, str(script), *argv],
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc, json.loads(out.read_text(encoding="utf-8"))

    return run
