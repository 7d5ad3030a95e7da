"""``__version__`` (#16 item 7): every subpackage says which lorafleet is installed."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@pytest.mark.parametrize(
    "package",
    ["lorafleet", "lorafleet.protocols", "lorafleet.client", "lorafleet.server", "lorafleet.sim"],
)
def test_each_subpackage_has_the_installed_version(package: str) -> None:
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    assert importlib.import_module(package).__version__ == version("lorafleet") == declared


@pytest.mark.parametrize("package", ["lorafleet", "lorafleet.client"])
def test_reading_the_version_imports_no_torch(package: str, tmp_path: Path) -> None:
    # From a folder outside the checkout, as an app would import the installed package
    code = f"import sys, {package} as p; print(p.__version__, 'torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert proc.stdout.split() == [version("lorafleet"), "False"]
