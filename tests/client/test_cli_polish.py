"""The CLIs' polish (#16 items 5-8): versions, checks before the model loads, no torch
for ``info --json``, generation knobs, every data shape from the shell."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorafleet.client.cli import _parser, main
from lorafleet.protocols.cli import package_version

LINES = "\n".join(
    [
        "Maya climbs at the gym on Tuesdays with Jonas.",
        "The cat Pixel sleeps on the radiator.",
        "Tidewatch shows the tide tables for the harbour.",
        "Lunch was lentil soup again.",
        "Remember to water the basil.",
        "Jonas says the new route is a sandbagged five.",
        "Pixel knocked the basil off the windowsill.",
        "Tidewatch now shows the next low tide.",
    ]
)


def _args(tmp_path: Path, base: Path | str) -> list[str]:
    return ["--profile", str(tmp_path / "p"), "--base", str(base)]


@pytest.mark.parametrize("program", ["lorafleet", "lorafleet-sim", "lorafleet-server"])
def test_every_command_prints_its_version(program: str) -> None:
    exe = Path(sys.executable).with_name(program)
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{program} {package_version()}"


def test_info_json_is_one_document_and_never_imports_torch(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a real profile with one version
    data = tmp_path / "notes.txt"
    data.write_text(LINES, encoding="utf-8")
    args = [*_args(tmp_path, tiny_model_dir), "--precision", "fp32", "--device", "cpu"]
    assert main(["train", *args, "--data", str(data), "--steps", "2", "--rank", "4"]) == 0
    code = (
        "import sys, json\n"
        "from lorafleet.client.cli import main\n"
        f"rc = main(['info', '--json', '--profile', {str(tmp_path / 'p')!r}])\n"
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}), file=sys.stderr)\n"
    )
    # Execute
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # Assert
    status = json.loads(proc.stderr.strip().splitlines()[-1])
    assert status == {"rc": 0, "torch": False}, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["lorafleet"] == package_version()
    assert doc["profile"]["current_version"] == 1
    assert doc["profile"]["spec"]["rank"] == 4
    assert [v["version"] for v in doc["profile"]["versions"]] == [1]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--steps", "0"], "steps must be >= 1"),
        (["--lr", "-1"], "lr must be a positive number"),
        (["--rank", "0"], "--rank must be >= 1"),
        (["--heldout", "1.5"], "heldout_fraction must be in [0, 1)"),
        (["--test-fraction", "0.7"], "test_fraction must be in [0, 0.5)"),
        (["--split", "paragraphs"], "got 1 notes; need at least 6"),
    ],
)
def test_bad_arguments_and_data_fail_before_the_model_loads_and_leave_no_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], fragment: str
) -> None:
    # Prepare: a base that does not exist, so any attempt to load it would be the error
    data = tmp_path / "notes.txt"
    data.write_text(LINES, encoding="utf-8")
    started = time.monotonic()
    # Execute
    code = main(["train", *_args(tmp_path, tmp_path / "no-base"), "--data", str(data), *extra])
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert fragment in err[0] and "no-base" not in err[0]
    assert time.monotonic() - started < 5
    assert not (tmp_path / "p").exists()


def test_one_note_per_line_is_explained_with_a_knob_that_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "notes.txt"
    data.write_text(LINES, encoding="utf-8")
    code = main(
        [
            "train",
            *_args(tmp_path, tmp_path / "no-base"),
            "--data",
            str(data),
            "--split",
            "paragraphs",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--split lines" in err and "min_train" not in err
    # Every flag the message names is one the parser has
    assert "--split" in _parser().format_help() or "--split" in _train_help()


def _train_help() -> str:
    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return str(sub.choices["train"].format_help())  # type: ignore[attr-defined]


def test_train_help_shows_every_default() -> None:
    text = " ".join(_train_help().split())
    for shown in ("(default: 60)", "(default: 0.002)", "(default: 4)", "(default: auto)"):
        assert shown in text, shown
    assert "(default: completion)" in text and "(default: None)" not in text


def test_a_failed_first_train_leaves_no_empty_profile(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: chats with no reply to learn from, found only once the tokenizer renders them
    data = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i}?"}]} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    args = [*_args(tmp_path, tiny_model_dir), "--precision", "fp32", "--device", "cpu"]
    # Execute
    code = main(["train", *args, "--data", str(data), "--steps", "2"])
    # Assert
    err = capsys.readouterr().err
    assert code == 2 and "nothing to learn from" in err and "--train-on all" in err
    assert not (tmp_path / "p").exists()
    # ... and the flag it names works
    assert main(["train", *args, "--data", str(data), "--steps", "2", "--train-on", "all"]) == 0


@pytest.mark.parametrize(
    ("name", "content", "flags"),
    [
        (
            "pairs.jsonl",
            "".join(
                json.dumps({"prompt": f"Q{i}: where is Pixel?", "completion": f" Radiator {i}."})
                + "\n"
                for i in range(8)
            ),
            [],
        ),
        (
            "alpaca.json",
            json.dumps(
                [
                    {"instruction": f"Plan {i}?", "input": "", "output": f"Climb {i}."}
                    for i in range(8)
                ]
            ),
            [],
        ),
        (
            "diary.csv",
            "day,body\n" + "".join(f"d{i},Note number {i}.\n" for i in range(8)),
            ["--text-column", "body"],
        ),
        ("notes.txt", LINES, []),
    ],
)
def test_train_reads_each_shape_from_the_shell(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: str,
    flags: list[str],
) -> None:
    data = tmp_path / name
    data.write_text(content, encoding="utf-8")
    args = [*_args(tmp_path, tiny_model_dir), "--precision", "fp32", "--device", "cpu"]
    code = main(["train", *args, "--data", str(data), "--steps", "2", "--rank", "4", *flags])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "on 6 notes" in out.out and "saved version 1" in out.out


def test_generate_raw_and_sampling_knobs(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "notes.txt"
    data.write_text(LINES, encoding="utf-8")
    args = [*_args(tmp_path, tiny_model_dir), "--precision", "fp32", "--device", "cpu"]
    assert main(["train", *args, "--data", str(data), "--steps", "2", "--rank", "4"]) == 0
    capsys.readouterr()

    def gen(*extra: str) -> str:
        assert main(["generate", *args, "--prompt", "Maya", "--max-new-tokens", "6", *extra]) == 0
        return capsys.readouterr().out

    sampled = [gen("--temperature", "1.5", "--top-p", "0.9", "--seed", str(s)) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # same seed, same text
    assert gen("--raw") == gen("--raw")  # greedy continuation is deterministic
    assert main(["generate", *args, "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
