from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.protocols.atomic import TMP_PREFIX, atomic_directory, atomic_write_text
from lorafleet.protocols.errors import LorafleetError, StorageError


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


FAULTS = {
    "read-only": ("read-only file system", "remount it read-write"),
    "full": ("disk full", "free some space"),
    "file in the way": ("a file stands where a folder is expected", "move it away"),
}


def _fault(kind: str, small_disk: object, tmp_path: Path) -> Path:
    """A folder with an old file ``f`` in it, then the fault; returns the folder."""
    if kind == "file in the way":
        folder = tmp_path / "blocked"
        folder.mkdir()
        atomic_write_text(folder / "f", "old")
        return folder
    folder = small_disk.path / "folder"  # type: ignore[attr-defined]
    atomic_write_text(folder / "f", "old")
    small_disk.read_only() if kind == "read-only" else small_disk.fill()  # type: ignore[attr-defined]
    return folder


@pytest.mark.parametrize("kind", list(FAULTS))
def test_a_write_that_cannot_happen_is_one_storage_error_and_changes_nothing(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Prepare: a real read-only mount, a real full file system (both refuse root), or a
    # file where a folder should be
    disk = None if kind == "file in the way" else request.getfixturevalue("small_disk")
    folder = _fault(kind, disk, tmp_path)
    target = folder / "sub" / "g" if kind == "file in the way" else folder / "f"
    if kind == "file in the way":
        (folder / "sub").write_text("I am a file")
    before = sorted(p.name for p in folder.iterdir())
    why, fix = FAULTS[kind]
    # Execute / Assert: the file write and the folder build each raise one clear error
    with pytest.raises(StorageError, match=why) as info:
        atomic_write_text(target, "x" * 100_000)
    assert str(target) in str(info.value) and fix in str(info.value)
    with pytest.raises(StorageError, match=why), atomic_directory(folder / "sub" / "v1") as tmp:
        (tmp / "w.bin").write_bytes(b"x" * 100_000)
    # nothing half-written: the old file as it was, no temporaries, no new folder
    assert (folder / "f").read_text() == "old"
    assert sorted(p.name for p in folder.iterdir()) == before
    assert "\n" not in str(info.value)
