"""Every CLI command the docs show still parses, and the offline ones still run (#14 item 9).

Each line of a shell code block (```sh, bash, console or unlabelled) in README.md and
docs/*.md that calls ``lorafleet``, ``lorafleet-sim`` or ``lorafleet-server`` is parsed by
that command's real argparse parser, so a renamed or removed flag, subcommand or
argument fails here with the file and line that documents it. Synopsis lines are parsed
twice: with every ``[optional part]`` and without any. Placeholders (URL, USER, ...)
stand for sample values. The user-administration commands, which need only a registry,
are run for real on a SQLite file, in the order the docs give them.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lorafleet.client.cli import _parser as client_parser
from lorafleet.server.cli import _parser as server_parser
from lorafleet.server.cli import main as server_main
from lorafleet.sim.cli import _parser as sim_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "lorafleet": client_parser,
    "lorafleet-sim": sim_parser,
    "lorafleet-server": server_parser,
}
FENCED_BLOCK = re.compile(r"^```([\w+-]*)\n(.*?)^```", re.S | re.M)  # every block, in order
SHELL = {"sh", "bash", "shell", "console", ""}
COMMAND = re.compile(r"^(?:\$ )?(lorafleet|lorafleet-sim|lorafleet-server)(?:\s|$)")
# Sample values for the placeholders the docs use (any type the parser wants).
PLACEHOLDERS = {"DEVICE_ID": "7", "SECONDS": "3600", "HOST:PORT": "127.0.0.1:9101"}


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    argv: tuple[str, ...]  # program name first

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


def _logical_lines(block: str, first_line: int) -> Iterator[tuple[int, str]]:
    """Lines of a block with backslash continuations joined, and their line numbers."""
    pending, start = "", first_line
    for offset, raw in enumerate(block.splitlines()):
        if not pending:
            start = first_line + offset
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def _variants(text: str) -> list[str]:
    """A synopsis with all its ``[optional parts]`` and with none; else the line itself."""
    if "[" not in text:
        return [text]
    return [re.sub(r"\[([^\]]*)\]", r"\1", text), re.sub(r"\s*\[[^\]]*\]", "", text)]


def documented_commands() -> list[DocCommand]:
    found: list[DocCommand] = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in FENCED_BLOCK.finditer(text):
            if block.group(1) not in SHELL:
                continue
            first = text.count("\n", 0, block.start(2)) + 1
            for number, line in _logical_lines(block.group(2), first):
                match = COMMAND.match(line.strip())
                if match is None:
                    continue
                line = line.strip().removeprefix("$ ")
                for variant in _variants(line):
                    argv = [PLACEHOLDERS.get(a, a) for a in shlex.split(variant, comments=True)]
                    found.append(DocCommand(f"{doc.relative_to(REPO)}:{number}", tuple(argv)))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands_of_every_program() -> None:
    # A broken extractor would make the parse test below pass vacuously.
    programs = {c.argv[0] for c in COMMANDS}
    assert programs == set(PARSERS), programs
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_a_documented_command_parses_with_the_real_parser(
    command: DocCommand, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = PARSERS[command.argv[0]]()
    try:
        parser.parse_args(list(command.argv[1:]))
    except SystemExit as exc:
        why = capsys.readouterr().err.strip().splitlines()[-1:]
        pytest.fail(f"{command} does not parse (exit {exc.code}): {why}")


def test_the_documented_enrolment_commands_run_on_a_real_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: every documented `users enroll-token` form, on a SQLite registry
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    forms = [c for c in COMMANDS if c.argv[:3] == ("lorafleet-server", "users", "enroll-token")]
    assert forms, "the docs no longer show how to issue an enrolment token"
    assert any("--create" in c.argv for c in forms), "the docs must say a new user needs --create"
    for n, command in enumerate(forms):
        new_user = f"u-doc-{n}"

        def run(user: str, command: DocCommand = command) -> tuple[int, str, str]:
            argv = [user if a == "USER" else url if a == "URL" else a for a in command.argv[1:]]
            code = server_main(argv)
            out, err = capsys.readouterr()
            return code, out.strip(), err

        # Execute / Assert: as documented, for a user the registry does not know yet
        code, out, err = run(new_user)
        if "--create" in command.argv:
            assert code == 0 and len(out) >= 32, f"{command}: {err}"
        else:  # refused with the fix, then works once the user exists
            assert code == 2 and "--create" in err, f"{command}: {err}"
            assert (
                server_main(["users", "enroll-token", "--registry", url, "--create", new_user]) == 0
            )
            capsys.readouterr()
            code, out, err = run(new_user)
            assert code == 0 and len(out) >= 32, f"{command}: {err}"
