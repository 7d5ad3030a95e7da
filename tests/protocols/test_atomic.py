from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.protocols.atomic import TMP_PREFIX, atomic_directory, atomic_write_text
from lorafleet.protocols.errors import LorafleetError


def test_a_directory_with_subfolders_appears_complete(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "v1") as tmp:
        (tmp / "sub" / "deeper").mkdir(parents=True)
        (tmp / "sub" / "deeper" / "w.bin").write_bytes(b"x" * 10)
        (tmp / "top.json").write_text("{}")
    assert (tmp_path / "v1" / "sub" / "deeper" / "w.bin").read_bytes() == b"x" * 10
    assert not any(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir())


def test_a_failed_block_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "v1") as tmp:
        (tmp / "half").write_text("partial")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_existing_targets_are_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "v1").mkdir()
    with (
        pytest.raises(LorafleetError, match="never overwritten"),
        atomic_directory(tmp_path / "v1"),
    ):
        pass


def test_atomic_write_replaces_whole_files(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "f", "old")
    atomic_write_text(tmp_path / "f", "new")
    assert (tmp_path / "f").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
