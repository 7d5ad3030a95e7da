from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lorafleet.client.cli import main

NOTES = "\n\n".join(
    [
        "Maya climbs at the gym on Tuesdays and Thursdays with her friend Jonas.",
        "The cat Pixel sleeps on the radiator every afternoon.",
        "Tidewatch is a small app that shows the tide tables for the harbour.",
        "Lunch was lentil soup again, and the bread from the corner bakery.",
        "Remember to water the basil and call the bakery about Saturday.",
        "Jonas says the new route at the gym is a sandbagged five.",
        "Pixel knocked the basil off the windowsill again this morning.",
        "Tidewatch now shows the next low tide on the home screen.",
    ]
)


def common(tmp_path: Path, base: Path) -> list[str]:
    return [
        "--profile",
        str(tmp_path / "p"),
        "--base",
        str(base),
        "--precision",
        "fp32",
        "--device",
        "cpu",
    ]


def test_train_eval_generate_info_from_the_shell(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    data = tmp_path / "notes.txt"
    data.write_text(NOTES, encoding="utf-8")
    args = common(tmp_path, tiny_model_dir)
    # Execute / Assert: each command works and says what happened
    assert (
        main(["train", *args, "--data", str(data), "--steps", "4", "--lr", "0.05", "--rank", "4"])
        == 0
    )
    out = capsys.readouterr().out
    assert "held-out loss:" in out and "saved version 1" in out
    assert main(["eval", *args, "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "base" in out and "adapter" in out
    assert main(["generate", *args, "--prompt", "Maya climbs", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["info", "--profile", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "* v0001" in out and '"rank": 4' in out


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        ("missing", "no such file"),
        ("empty", "empty"),
        ("latin1", "UTF-8"),
    ],
)
def test_bad_data_prints_one_error_line_and_exits_2(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    setup: str,
    fragment: str,
) -> None:
    data = tmp_path / "notes.txt"
    if setup == "empty":
        data.write_text("", encoding="utf-8")
    elif setup == "latin1":
        data.write_bytes("Café on Tuesdays with Jonas.\n\nMore notes.".encode("latin-1"))
    code = main(["train", *common(tmp_path, tiny_model_dir), "--data", str(data), "--steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize(
    ("fault", "fragment"),
    [("read-only", "read-only file system; remount it"), ("full", "disk full; free some space")],
)
def test_train_on_a_profile_that_cannot_be_written_is_one_error_line(
    tiny_model_dir: Path,
    tmp_path: Path,
    small_disk: Any,
    capsys: pytest.CaptureFixture[str],
    fault: str,
    fragment: str,
) -> None:
    # Prepare: a profile with one version on its own small file system, then the fault
    # (a real read-only mount or a real full disk: both refuse root, unlike chmod)
    data = tmp_path / "notes.txt"
    data.write_text(NOTES, encoding="utf-8")
    profile = small_disk.path / "p"
    args = ["--profile", str(profile), "--base", str(tiny_model_dir)]
    args += ["--precision", "fp32", "--device", "cpu"]
    train = ["train", *args, "--data", str(data), "--steps", "2", "--rank", "4"]
    assert main(train) == 0
    capsys.readouterr()
    before = _snapshot(profile)
    small_disk.read_only() if fault == "read-only" else small_disk.fill()
    # Execute
    code = main(train)
    # Assert: exit 2, one error line (beside progress bars) naming the profile and the
    # fix, no traceback, the profile as it was
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert code == 2 and "Traceback" not in stderr
    assert len(errors) == 1 and errors[0].startswith("error: cannot write "), stderr
    assert str(profile) in errors[0] and fragment in errors[0]
    assert _snapshot(profile) == before


@pytest.mark.parametrize("command", ["train", "export"])
def test_a_command_that_would_write_on_a_read_only_mount_is_one_error_line(
    tiny_model_dir: Path,
    tmp_path: Path,
    small_disk: Any,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    # Prepare: a new profile, or the ONNX export cache, on a read-only mount
    data = tmp_path / "notes.txt"
    data.write_text(NOTES, encoding="utf-8")
    small_disk.read_only()
    target = small_disk.path / ("p" if command == "train" else "cache")
    argv = (
        ["train", *common(tmp_path, tiny_model_dir), "--data", str(data), "--steps", "2"]
        if command == "train"
        else ["export", "--base", str(tiny_model_dir), "--cache-dir", str(target)]
    )
    argv = [str(target) if a == str(tmp_path / "p") else a for a in argv]
    # Execute
    code = main(argv)
    # Assert: exit 2 and one line naming the path and the fix; nothing was written
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert code == 2 and "Traceback" not in stderr
    assert len(errors) == 1 and str(target) in errors[0], stderr
    assert "read-only" in errors[0].lower() and ("writable" in errors[0])
    assert list(small_disk.path.iterdir()) == []


def test_info_on_a_folder_that_is_not_a_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", "--profile", str(tmp_path)]) == 2
    assert "not a lorafleet profile" in capsys.readouterr().err


def test_the_installed_command_never_shows_a_traceback(tmp_path: Path) -> None:
    # Prepare: good notes, but a base model path that does not exist
    data = tmp_path / "notes.txt"
    data.write_text(NOTES, encoding="utf-8")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafleet.client.cli",
            "train",
            "--profile",
            str(tmp_path / "p"),
            "--base",
            str(tmp_path / "no-such-model"),
            "--data",
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: ") and "no-such-model" in proc.stderr


def test_generate_on_a_folder_that_is_not_a_profile_creates_nothing(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["generate", *common(tmp_path, tiny_model_dir), "--prompt", "hi"])
    assert code == 2
    assert "not a lorafleet profile yet" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_generate_on_the_onnx_backend_from_the_shell(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: a trained profile; exports go to a cache of the test's own.
    caplog.set_level(logging.INFO, logger="lorafleet")
    data = tmp_path / "notes.txt"
    data.write_text(NOTES, encoding="utf-8")
    args = [*common(tmp_path, tiny_model_dir), "--cache-dir", str(tmp_path / "cache")]
    ask = ["--prompt", "Maya climbs", "--max-new-tokens", "8"]
    assert main(["train", *args, "--data", str(data), "--steps", "2", "--rank", "4"]) == 0
    capsys.readouterr()

    # Execute
    assert main(["generate", *args, *ask]) == 0
    torch_reply = capsys.readouterr().out
    assert main(["generate", *args, *ask, "--backend", "onnx", "--provider", "cpu"]) == 0
    onnx = capsys.readouterr()

    # Assert: float32 ONNX says what torch says; the one-time export and the provider are
    # announced (int8 runs the same code with another export: tests/client/test_sdk_onnx.py).
    assert onnx.out == torch_reply and torch_reply.strip()
    assert "exporting base" in onnx.err and "once" in onnx.err
    assert "['CPUExecutionProvider'] (override)" in caplog.text


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--provider", "cpu"], "applies to the --backend onnx variants"),
        (["--backend", "onnx-int8", "--provider", "cuda"], "onnxruntime-gpu"),
    ],
)
def test_bad_backend_and_provider_combinations_are_one_error_line(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    fragment: str,
) -> None:
    # Prepare: an ONNX Runtime without the CUDA execution provider
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])

    # Execute
    code = main(["generate", *common(tmp_path, tiny_model_dir), "--prompt", "hi", *extra])

    # Assert: refused before anything is loaded or created
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0]
    assert not (tmp_path / "p").exists()
