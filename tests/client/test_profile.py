"""The profile folder under concurrent writers and crashes (#14 item 6)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lorafleet.client.profile import ADAPTERS_DIR, Profile
from lorafleet.protocols.atomic import TMP_PREFIX
from lorafleet.protocols.spec import AdapterSpec

SPEC = AdapterSpec(base_model_id="tiny", base_sha256="ab" * 32, rank=4)

# A save in another process, held half-way: inside Profile.writing() (what Profile.save
# holds) and atomic_directory (what save_adapter writes the version folder with).
SAVER = """
import sys, time
from pathlib import Path
from lorafleet.client.profile import ADAPTERS_DIR, Profile
from lorafleet.protocols.atomic import atomic_directory

profile = Profile.open(Path(sys.argv[1]))
with profile.writing(), atomic_directory(profile.root / ADAPTERS_DIR / "v0001") as tmp:
    (tmp / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    Path(sys.argv[2]).touch()
    while not Path(sys.argv[3]).exists():
        time.sleep(0.02)
"""


def start_saver(root: Path, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(root), str(ready), str(go)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, "the saver process died"
        assert time.monotonic() < deadline, "the saver never got half-way"
        time.sleep(0.02)
    return proc, go


def temporaries(root: Path) -> list[Path]:
    return [p for p in (root / ADAPTERS_DIR).iterdir() if p.name.startswith(TMP_PREFIX)]


def test_open_keeps_another_process_s_save_in_progress(tmp_path: Path) -> None:
    # Prepare: a second process is half-way through writing version 1
    root = tmp_path / "p"
    Profile.create(root, SPEC, base_source="default")
    saver, go = start_saver(root, tmp_path)
    try:
        assert len(temporaries(root)) == 1
        # Execute: this process opens the profile meanwhile
        Profile.open(root)
        # Assert: the save's temporary folder is still there, and the save completes
        assert len(temporaries(root)) == 1
    finally:
        go.touch()
        assert saver.wait(timeout=60) == 0
    assert (root / ADAPTERS_DIR / "v0001" / "adapter_model.safetensors").is_file()
    assert temporaries(root) == []


def test_open_removes_what_a_killed_save_left(tmp_path: Path) -> None:
    # Prepare: the saving process is killed half-way (the kernel drops its lock)
    root = tmp_path / "p"
    Profile.create(root, SPEC, base_source="default")
    saver, _ = start_saver(root, tmp_path)
    os.kill(saver.pid, signal.SIGKILL)
    saver.wait(timeout=60)
    assert len(temporaries(root)) == 1
    # Execute
    Profile.open(root)
    # Assert: the leftover is gone and no version appeared
    assert temporaries(root) == [] and not (root / ADAPTERS_DIR / "v0001").exists()
