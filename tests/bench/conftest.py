"""Shared by the benchmark tests: one --quick run of a benchmark on the tiny base."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

QuickRun = Callable[..., tuple[subprocess.CompletedProcess[str], dict[str, Any]]]
BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def load_bench_script(monkeypatch: pytest.MonkeyPatch, script: Path, name: str) -> ModuleType:
    """Import a ``bench/`` script as module ``name`` (with ``bench/`` on the path, as it runs)."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(name, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


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
