"""A user's personal training data: reading notes, splitting off a held-out set, packing tokens.

Personal data is whatever a person already has: a text file of notes, a Markdown file, a
JSON Lines, JSON, CSV/TSV or Parquet export of notes, chats or prompt/completion pairs in
the shapes the ecosystem uses (TRL, Alpaca, ShareGPT, OpenAI ``messages``), or a folder of
those. This module turns it into :class:`Example` values, splits them into train and
held-out sets in a way that stays put as notes are added, and packs them into
fixed-length token blocks for causal-LM training, with the loss on completions only
where the data says what the prompt was (as TRL does). Every mistake in the data raises one
:class:`~lorafleet.protocols.errors.DataError` line naming the file (and the line or byte)
and the fix, because the person reading it is usually not the person who wrote the code.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from lorafleet.protocols.errors import DataError, LorafleetError, SpecError

__all__ = [
    "ROLES",
    "SPLITS",
    "TRAIN_ON",
    "DataConfig",
    "Example",
    "Split",
    "TokenBlocks",
    "TrainOn",
    "demo_notes_path",
    "encode_blocks",
    "encode_notes",
    "example_from_record",
    "examples_from_records",
    "read_examples",
    "split_examples",
    "to_examples",
]

if TYPE_CHECKING:  # reading data needs no torch: `lorafleet train` checks it before loading
    import torch

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
"""Roles a conversation message may have (the ones every chat template understands)."""

IGNORE_INDEX = -100
"""Label of positions that carry no loss (PyTorch's ``cross_entropy`` default)."""

Split = Literal["auto", "paragraphs", "lines"]
"""How a ``.txt``/``.md`` file is cut into notes (see :func:`read_examples`)."""
SPLITS: tuple[str, ...] = get_args(Split)

TrainOn = Literal["completion", "all"]
"""Which tokens carry the loss: ``completion`` masks prompts (TRL's completion-only and
assistant-only loss), ``all`` trains on every token. Plain notes are all completion."""
TRAIN_ON: tuple[str, ...] = get_args(TrainOn)

_NOTE_SUFFIXES = (".txt", ".md")
_JSONL_SUFFIX = ".jsonl"
_TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_SUFFIXES = (*_NOTE_SUFFIXES, _JSONL_SUFFIX, ".json", *_TABLE_DELIMITERS, ".parquet")
_SUFFIX_LIST = ".txt, .md, .jsonl, .json, .csv, .tsv or .parquet"
_INLINE_SPACE = re.compile(r"[^\S\n]+")  # whitespace other than newline
_MIN_SEQ_LEN = 8
_SPLIT_DOMAIN = b"lorafleet/split/v1\x00"
_FORMAT_HINT = (
    'a record is {"text": ...}, {"messages": [{"role": ..., "content": ...}, ...]}, '
    '{"prompt": ..., "completion": ...}, {"instruction": ..., "input": ..., "output": ...} '
    'or {"conversations": [{"from": ..., "value": ...}, ...]} (docs/sdk.md, "Data formats")'
)
# Turns a personal adapter does not learn from: tool results and tool calls (OpenAI
# ``tool``/``function``, ShareGPT ``observation``/``function_call``, Llama ``ipython``).
_TOOL_ROLES = frozenset({"tool", "function", "ipython", "observation", "function_call"})
_ROLE_ALIASES = {"developer": "system", "human": "user", "gpt": "assistant", "model": "assistant"}


@dataclass(frozen=True)
class Example:
    """One unit of personal data: a note (plain text) or a conversation.

    Exactly one of ``text`` and ``messages`` is set. ``source`` says where the example
    came from (``file:line``) so that errors found later, while encoding, can still
    point at the line to fix; it takes no part in the train/held-out split.

    A prompt/completion pair (TRL's format) is a note whose ``text`` is the completion
    and whose ``prompt`` is read before it, or a conversation whose first
    ``prompt_messages`` messages are the prompt. With completion-only loss (the default
    of :func:`encode_blocks`) the prompt is context and carries no loss; in a
    conversation only assistant turns after the prompt do.

    Examples
    --------
    >>> Example(text="Walked Turnip along the harbour.").text
    'Walked Turnip along the harbour.'
    >>> Example(messages=[("user", "hi"), ("assistant", "hello")]).messages
    (('user', 'hi'), ('assistant', 'hello'))
    >>> Example(text=" the harbour.", prompt="Where did I walk Turnip?").prompt
    'Where did I walk Turnip?'
    """

    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    source: str = ""
    prompt: str | None = None
    prompt_messages: int = 0

    def __post_init__(self) -> None:
        where = self.source or "example"
        if (self.text is None) == (self.messages is None):
            raise DataError(f"{where}: set exactly one of text (a note) or messages (a chat)")
        if self.text is not None:
            if not isinstance(self.text, str):
                raise DataError(f"{where}: text must be a string, got {type(self.text).__name__}")
            if not self.text.strip():
                raise DataError(f"{where}: the note is empty; write some text or remove it")
            if self.prompt is not None and not isinstance(self.prompt, str):
                raise DataError(
                    f"{where}: prompt must be a string, got {type(self.prompt).__name__}"
                )
            if self.prompt_messages:
                raise DataError(f"{where}: prompt_messages applies to conversations only")
            return
        if self.prompt is not None:
            raise DataError(
                f"{where}: a conversation's prompt is its first prompt_messages messages, "
                "not a prompt string"
            )
        raw = self.messages
        if isinstance(raw, str | bytes) or not isinstance(raw, Sequence) or not raw:
            raise DataError(f"{where}: messages must be a non-empty list of (role, content) pairs")
        pairs: list[tuple[str, str]] = []
        for i, message in enumerate(raw, start=1):
            if isinstance(message, str | bytes) or not isinstance(message, Sequence):
                raise DataError(f"{where}: message {i} must be a (role, content) pair")
            if len(message) != 2:
                raise DataError(f"{where}: message {i} must be a (role, content) pair")
            role, content = message
            if role not in ROLES:
                raise DataError(
                    f"{where}: message {i} has unknown role {role!r}; use one of "
                    + ", ".join(repr(r) for r in ROLES)
                )
            if not isinstance(content, str):
                raise DataError(
                    f"{where}: message {i} content must be a string, got {type(content).__name__}"
                )
            pairs.append((role, content))
        n = self.prompt_messages
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < len(pairs):
            raise DataError(
                f"{where}: prompt_messages must be an integer in 0..{len(pairs) - 1} "
                f"(the completion needs at least one message), got {n!r}"
            )
        object.__setattr__(self, "messages", tuple(pairs))

    def content_key(self) -> bytes:
        """Canonical bytes of the content (not the source); equal content, equal key."""
        if self.text is not None:
            if self.prompt is not None:
                return b"pair\x00" + json.dumps([self.prompt, self.text]).encode()
            return b"text\x00" + self.text.encode()
        assert self.messages is not None
        chat = json.dumps(self.messages, ensure_ascii=False).encode()
        if self.prompt_messages:
            return b"chat\x00" + chat + b"\x00" + str(self.prompt_messages).encode()
        return b"chat\x00" + chat


# ---------------------------------------------------------------------------- reading


def read_examples(
    path: str | Path, *, split: Split = "auto", text_field: str | None = None
) -> list[Example]:
    """Read personal data from a file or a folder of files.

    Parameters
    ----------
    path
        One of

        - a ``.txt`` or ``.md`` file of notes (see ``split``). Inside a note, runs of
          spaces and tabs become one space and line breaks are kept. In a ``.txt`` file,
          lines starting with ``#`` at the start of a note are comments.
        - a ``.jsonl`` file (one record per line; blank lines skipped), a ``.json`` file
          holding an array of records, a ``.csv`` or ``.tsv`` file with a header row
          (one record per row), or a ``.parquet`` file (one record per row; needs
          ``pyarrow``). A record is one of the shapes :func:`example_from_record` reads:
          ``text``, ``messages``, ``prompt``/``completion``, Alpaca or ShareGPT. Texts
          are kept exactly as written; other fields are ignored.
        - a folder: every file of those types under it, recursively, in sorted path
          order; hidden files and folders are skipped.
    split
        How a ``.txt``/``.md`` file is cut into notes: ``"paragraphs"`` (notes separated
        by one or more blank lines), ``"lines"`` (one note per line) or ``"auto"``:
        paragraphs, except that a file given on its own with several lines and no blank
        line at all is read one note per line, and a warning says so.
    text_field
        Read only this field of every record as a plain note (a CSV's text column,
        say) instead of recognising the record's shape.

    Returns
    -------
    list[Example]
        In file order; each example's ``source`` is ``file:line`` (``file:row N`` for
        Parquet, ``file:record N`` for a JSON array).

    Raises
    ------
    DataError
        The path is missing, a file is empty, not UTF-8, not valid JSON, of an
        unsupported type, or a record has no known shape; the message names the file,
        the place and the fix.

    Examples
    --------
    >>> examples = read_examples(demo_notes_path())
    >>> len(examples) > 100, examples[0].text is not None
    (True, True)
    """
    if split not in SPLITS:
        raise SpecError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder; check the path to your notes")
    if p.is_dir():
        return _read_dir(p, "paragraphs" if split == "auto" else split, text_field)
    return _read_file(p, split, text_field)


def _read_dir(folder: Path, split: Split, text_field: str | None) -> list[Example]:
    found: list[Path] = []
    skipped: list[Path] = []
    for candidate in sorted(folder.rglob("*")):
        rel = candidate.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not candidate.is_file():
            continue
        (found if candidate.suffix.lower() in _SUFFIXES else skipped).append(candidate)
    if skipped:
        logger.warning(
            "skipping %d file(s) under %s that are not %s: %s",
            len(skipped),
            folder,
            _SUFFIX_LIST,
            ", ".join(str(s.relative_to(folder)) for s in skipped[:5])
            + (" ..." if len(skipped) > 5 else ""),
        )
    if not found:
        raise DataError(f"{folder}: no {_SUFFIX_LIST} files in this folder; put your notes in one")
    examples: list[Example] = []
    for file in found:
        examples.extend(_read_file(file, split, text_field))
    return examples


def _read_file(file: Path, split: Split, text_field: str | None) -> list[Example]:
    suffix = file.suffix.lower()
    if suffix not in _SUFFIXES:
        raise DataError(
            f"{file}: unsupported file type {file.suffix or '(no extension)'!r}; use .txt or .md "
            "(notes separated by blank lines), .jsonl, .json, .csv, .tsv or .parquet (records)"
        )
    if suffix in _NOTE_SUFFIXES:
        examples = _parse_notes(file, _read_utf8(file), split)
        what, only = "notes", "comments and blank lines"
    else:
        examples = examples_from_records(_records(file, suffix), text_field=text_field)
        what = "JSON lines" if suffix == _JSONL_SUFFIX else "records"
        only = "a header" if suffix in _TABLE_DELIMITERS else "blank lines or []"
    if not examples:
        raise DataError(
            f"{file}: no {what} found (the file is empty or holds only {only}); "
            "add notes or remove the file"
        )
    return examples


def _records(file: Path, suffix: str) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for every record of a structured file, in file order."""
    if suffix == ".parquet":
        yield from _parquet_records(file)
        return
    text = _read_utf8(file)
    if suffix == _JSONL_SUFFIX:
        for lineno, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                yield f"{file}:{lineno}", _json(line, f"{file}:{lineno}")
    elif suffix == ".json":
        if not text.strip():
            return
        data = _json(text, str(file))
        if not isinstance(data, list):
            raise DataError(
                f"{file}: expected a JSON array of records, got {type(data).__name__}; "
                "wrap the records in [...] or write them one per line as .jsonl"
            )
        for i, record in enumerate(data, start=1):
            yield f"{file}:record {i}", record
    else:
        delimiter = _TABLE_DELIMITERS[suffix]
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        try:
            for row in reader:
                if None in row:  # more cells than the header has names
                    raise DataError(
                        f"{file}:{reader.line_num}: this row has more cells than the header "
                        "has columns; quote cells that hold the delimiter"
                    )
                yield f"{file}:{reader.line_num}", row
        except csv.Error as exc:
            raise DataError(
                f"{file}:{reader.line_num}: not valid {suffix[1:].upper()} ({exc}); check its quoting"
            ) from None


def _parquet_records(file: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{file}: reading Parquet needs pyarrow; install it (pip install 'lorafleet[parquet]') "
            "or export the data as .jsonl"
        ) from None

    try:
        rows = pq.read_table(file).to_pylist()
    except Exception as exc:  # pyarrow raises its own error types for damaged files
        raise DataError(f"{file}: not a readable Parquet file ({exc}); export it again") from None
    for i, row in enumerate(rows, start=1):
        yield f"{file}:row {i}", row


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = (
            f"line {exc.lineno} column {exc.colno}"
            if "\n" in text.strip()
            else f"column {exc.colno}"
        )
        raise DataError(f"{where}: not valid JSON ({exc.msg} at {at}); {_FORMAT_HINT}") from None


def _read_utf8(file: Path) -> str:
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise DataError(
            f"{file}: cannot read the file ({exc.strerror}); check its permissions"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{file}: not valid UTF-8 at byte {exc.start} (line {line}); re-save the file "
            "with UTF-8 encoding"
        ) from None
    text = text.removeprefix("\ufeff")  # a BOM some editors write
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _parse_notes(file: Path, text: str, split: Split) -> list[Example]:
    """Split notes on blank lines (or lines); in .txt, leading ``#`` lines of a note are comments."""
    comments = file.suffix.lower() == ".txt"
    lines = [(n, _INLINE_SPACE.sub(" ", raw).strip()) for n, raw in enumerate(text.split("\n"), 1)]
    if split == "auto":
        content = [n for n, line in lines if line]
        gapless = bool(content) and content[-1] - content[0] + 1 == len(content)
        split = "lines" if gapless and len(content) > 1 else "paragraphs"
        if split == "lines":
            logger.warning(
                "%s has %d lines and no blank line, so each line is read as one note; "
                "separate multi-line notes by blank lines, or pass --split paragraphs "
                "(split='paragraphs') to read the whole file as one note",
                file,
                len(content),
            )
    examples: list[Example] = []
    block: list[tuple[int, str]] = []  # (line number, cleaned line) of the current note

    def flush() -> None:
        skip = 0
        if comments:
            while skip < len(block) and block[skip][1].startswith("#"):
                skip += 1
        kept = block[skip:]
        if kept:
            note = "\n".join(line for _, line in kept)
            examples.append(Example(text=note, source=f"{file}:{kept[0][0]}"))
        block.clear()

    for lineno, line in lines:
        if line:
            block.append((lineno, line))
        if not line or split == "lines":
            flush()
    flush()
    return examples


# ---------------------------------------------------------------------------- records


def examples_from_records(
    records: Iterable[Any] | Iterable[tuple[str, Any]], *, text_field: str | None = None
) -> list[Example]:
    """Examples from records: dicts from a file, a list, or a Hugging Face ``Dataset``.

    Parameters
    ----------
    records
        Mappings in one of the shapes :func:`example_from_record` reads, or
        ``(where, mapping)`` pairs whose ``where`` names the record in errors. Anything
        iterable works; a ``datasets.Dataset`` iterates as dicts (``to_list()`` also).
    text_field
        As for :func:`example_from_record`.

    Returns
    -------
    list[Example]
        In record order; tool turns dropped (logged once with their count).

    Examples
    --------
    >>> rows = [{"instruction": "Greet Tomas.", "input": "", "output": "Morning, Tomas!"}]
    >>> examples_from_records(rows)[0].messages
    (('user', 'Greet Tomas.'), ('assistant', 'Morning, Tomas!'))
    """
    examples: list[Example] = []
    dropped = [0]
    for i, item in enumerate(records, start=1):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            where, record = item
        else:
            where, record = f"record {i}", item
        examples.append(_from_record(record, where, text_field, dropped))
    if dropped[0]:
        logger.info("dropped %d tool turn(s): the adapter learns replies, not tools", dropped[0])
    return examples


def example_from_record(
    record: Mapping[str, Any], where: str = "record", *, text_field: str | None = None
) -> Example:
    """One example from one record in any of the shapes the ecosystem uses.

    The first shape whose fields the record has wins, in this order:

    1. ``messages``: OpenAI / TRL conversational, ``[{"role", "content"}, ...]``.
       ``developer`` counts as ``system``; text parts of a list ``content`` are joined.
    2. ``conversations``: ShareGPT, ``[{"from", "value"}, ...]`` with ``human``,
       ``gpt``, ``system`` (or ``user``/``assistant``).
    3. ``prompt`` and ``completion``: TRL prompt/completion, both strings (standard) or
       both message lists (conversational).
    4. ``instruction`` and ``output`` (optional ``input``, ``system``): Alpaca, read as
       a conversation: the instruction, a blank line and the input as the user turn,
       the output as the assistant's.
    5. ``text``: a plain note.

    Tool turns (roles ``tool``, ``function``, ``ipython``, ShareGPT ``observation`` and
    ``function_call``) and assistant turns that only call tools are dropped: a personal
    adapter learns the person's words, and small bases have no tool template. System
    turns are kept as context and never carry loss.

    Parameters
    ----------
    record
        One record (a dict).
    where
        Names the record in errors (``file:line``).
    text_field
        Read only this field, as a plain note (e.g. a CSV's text column).

    Raises
    ------
    DataError
        The record has no known shape or a field of the wrong type; one line naming
        ``where``, the field and the fix.

    Examples
    --------
    >>> example_from_record({"prompt": "Tuesday plans?", "completion": " Climbing."}).prompt
    'Tuesday plans?'
    """
    return _from_record(record, where, text_field, [0])


def _from_record(record: Any, where: str, text_field: str | None, dropped: list[int]) -> Example:
    if not isinstance(record, Mapping):
        raise DataError(
            f"{where}: expected a JSON object, got {type(record).__name__}; {_FORMAT_HINT}"
        )
    if text_field is not None:
        if text_field not in record:
            found = ", ".join(repr(str(k)) for k in list(record)[:8])
            raise DataError(
                f"{where}: no field {text_field!r} (found {found}); name the text column that exists"
            )
        return Example(text=_string(record, text_field, where), source=where)
    if "messages" in record:
        messages = _messages(record, "messages", where, ("role", "content"), dropped)
        return Example(messages=messages, source=where)
    if "conversations" in record:
        messages = _messages(record, "conversations", where, ("from", "value"), dropped)
        return Example(messages=messages, source=where)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return Example(text=completion, prompt=prompt or None, source=where)
        if isinstance(prompt, list) and isinstance(completion, list):
            head = _messages(record, "prompt", where, ("role", "content"), dropped, empty=True)
            tail = _messages(record, "completion", where, ("role", "content"), dropped)
            return Example(messages=head + tail, prompt_messages=len(head), source=where)
        raise DataError(
            f'{where}: "prompt" and "completion" must both be strings or both be lists of '
            f"messages, got {type(prompt).__name__} and {type(completion).__name__}"
        )
    if "instruction" in record and "output" in record:
        user = _string(record, "instruction", where)
        extra = _string(record, "input", where, optional=True)
        if extra.strip():
            user = f"{user}\n\n{extra}"
        system = _string(record, "system", where, optional=True)
        turns = ([("system", system)] if system.strip() else []) + [("user", user)]
        reply = ("assistant", _string(record, "output", where))
        return Example(messages=(*turns, reply), prompt_messages=len(turns), source=where)
    if "text" in record:
        return Example(text=_string(record, "text", where), source=where)
    found = ", ".join(f'"{k}"' for k in list(record)[:8]) or "no fields"
    raise DataError(
        f"{where}: object has none of the known fields (found {found}); {_FORMAT_HINT}; "
        "for a table, name its text column (--text-column)"
    )


def _string(record: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f'{where}: "{key}" must be a string, got {type(value).__name__}; {_FORMAT_HINT}'
        )
    return value


def _messages(
    record: Mapping[str, Any],
    key: str,
    where: str,
    fields: tuple[str, str],
    dropped: list[int],
    *,
    empty: bool = False,
) -> tuple[tuple[str, str], ...]:
    """Normalized (role, content) turns of one message list; tool turns dropped."""
    raw = record[key]
    if not isinstance(raw, list) or not (raw or empty):
        raise DataError(f'{where}: "{key}" must be a non-empty list; {_FORMAT_HINT}')
    role_key, content_key = fields
    label = "message" if key == "messages" else f"{key} message"
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(raw, start=1):
        if not isinstance(message, Mapping) or role_key not in message:
            raise DataError(
                f'{where}: {label} {i} must be an object with "{role_key}" and '
                f'"{content_key}"; {_FORMAT_HINT}'
            )
        role = message[role_key]
        role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        content = message.get(content_key)
        if role in _TOOL_ROLES or (
            role == "assistant" and message.get("tool_calls") and not content
        ):
            dropped[0] += 1
            continue
        if content_key not in message:
            raise DataError(
                f'{where}: {label} {i} must be an object with "{role_key}" and '
                f'"{content_key}"; {_FORMAT_HINT}'
            )
        if role not in ROLES:
            raise DataError(
                f"{where}: {label} {i} has unknown {role_key} {role!r}; use one of "
                + ", ".join(repr(r) for r in ROLES)
                + " (tool turns are dropped)"
            )
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            if not all(
                isinstance(part, Mapping) and part.get("type") == "text" for part in content
            ):
                raise DataError(
                    f"{where}: {label} {i} has non-text content parts; only text is "
                    "trained on, remove images and audio"
                )
            content = "".join(str(part.get("text", "")) for part in content)
        if not isinstance(content, str):
            raise DataError(
                f"{where}: {label} {i} {content_key} must be a string, got {type(content).__name__}"
            )
        turns.append((role, content))
    if not turns and not empty:
        raise DataError(
            f'{where}: "{key}" holds only tool turns, which are dropped; remove the record'
        )
    return tuple(turns)


@dataclass(frozen=True)
class DataConfig:
    """How a user's data is read and which tokens train, for the SDK and the CLI.

    Examples
    --------
    >>> DataConfig(split="lines", train_on="all").text_field is None
    True
    """

    split: Split = field(
        default="auto",
        metadata={"help": "How .txt/.md files are cut into notes: auto, paragraphs or lines."},
    )
    text_field: str | None = field(
        default=None,
        metadata={"help": "Read only this field (a table's text column) of every record."},
    )
    train_on: TrainOn = field(
        default="completion",
        metadata={"help": "completion: loss on completions and assistant replies; all: on all."},
    )

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise SpecError(f"data: split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.train_on not in TRAIN_ON:
            raise SpecError(
                f"data: train_on must be one of {', '.join(TRAIN_ON)}, got {self.train_on!r}"
            )
        if self.text_field is not None and (
            not isinstance(self.text_field, str) or not self.text_field
        ):
            raise SpecError(f"data: text_field must be a column name, got {self.text_field!r}")


def to_examples(data: Any, config: DataConfig | None = None) -> list[Example]:
    """Examples from whatever an app holds: a path, notes, examples, records or a dataset.

    Parameters
    ----------
    data
        A file or folder path (:func:`read_examples`); or an iterable of ``str`` notes,
        :class:`Example` values and record dicts (:func:`example_from_record`), such as
        a list, a Hugging Face ``datasets.Dataset`` (it iterates as dicts) or anything
        with a ``to_list()`` method; blank notes are skipped.
    config
        Reading options; the default reads every shape as documented.

    Raises
    ------
    DataError
        Nothing to train on, or an item of another type (named by its index).

    Examples
    --------
    >>> len(to_examples(["Walked Turnip.", {"prompt": "Cat?", "completion": " Pixel."}]))
    2
    """
    config = config or DataConfig()
    if isinstance(data, str | os.PathLike):
        return read_examples(Path(data), split=config.split, text_field=config.text_field)
    if isinstance(data, bytes | Mapping):
        raise DataError(
            f"training data must be a path or a list of notes or records, got {type(data).__name__}"
        )
    items = data.to_list() if callable(getattr(data, "to_list", None)) else data
    if not isinstance(items, Iterable):
        raise DataError(f"training data must be a path or an iterable, got {type(data).__name__}")
    examples: list[Example] = []
    dropped = [0]
    for i, item in enumerate(items, start=1):
        if isinstance(item, Example):
            examples.append(item)
        elif isinstance(item, str):
            if item.strip():
                examples.append(Example(text=item, source=f"item {i}"))
        elif isinstance(item, Mapping):
            examples.append(_from_record(item, f"item {i}", config.text_field, dropped))
        else:
            raise DataError(
                f"item {i}: training data items must be str, Example or a record dict, "
                f"got {type(item).__name__}"
            )
    if not examples:
        raise DataError(
            "no training text given; pass a file, a folder, or a list of non-empty notes"
        )
    return examples


def demo_notes_path() -> Path:
    """Return the packaged notes of the fictional demo user (``client/demo_data/notes.txt``).

    Examples
    --------
    >>> demo_notes_path().name
    'notes.txt'
    """
    resource = files("lorafleet.client.demo_data").joinpath("notes.txt")
    path = Path(str(resource))
    if not path.is_file():
        raise LorafleetError(
            f"demo notes not found at {path}; reinstall lorafleet from a regular (unzipped) install"
        )
    return path


# ---------------------------------------------------------------------------- splitting


def split_examples(
    examples: Sequence[Example],
    heldout_fraction: float = 0.2,
    *,
    seed: int = 0,
    min_train: int = 4,
    min_heldout: int = 2,
) -> tuple[list[Example], list[Example]]:
    """Split examples into a training set and a held-out set for evaluation.

    Each distinct content gets a score from a hash of the seed and the content, and the
    lowest-scoring ones are held out. So the split depends neither on input order nor on
    the machine, identical notes always land on the same side (no leak of held-out text
    into training), and adding a note later moves at most one or two old notes across.

    Parameters
    ----------
    examples
        What :func:`read_examples` returned.
    heldout_fraction
        Share held out, in ``[0, 1)``; rounded, then raised to at least ``min_heldout``.
    seed
        Another seed gives another split.
    min_train, min_heldout
        Fewer distinct examples than ``min_train + min_heldout`` is a :class:`DataError`.

    Returns
    -------
    tuple[list[Example], list[Example]]
        ``(train, heldout)``, each in input order; together exactly the input.

    Examples
    --------
    >>> notes = [Example(text=f"note {i}") for i in range(10)]
    >>> train, heldout = split_examples(notes)
    >>> len(train), len(heldout)
    (8, 2)
    """
    if not isinstance(heldout_fraction, int | float) or not 0 <= heldout_fraction < 1:
        raise SpecError(f"heldout_fraction must be in [0, 1), got {heldout_fraction!r}")
    for name, value, low in (("min_train", min_train, 1), ("min_heldout", min_heldout, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SpecError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise SpecError(f"seed must be an integer in 0..2**64-1, got {seed!r}")

    groups: dict[bytes, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(example.content_key(), []).append(i)
    n = len(examples)
    need = min_train + min_heldout
    if len(groups) < need:
        distinct = "" if len(groups) == n else f" ({len(groups)} distinct)"
        raise DataError(
            f"got {n} notes{distinct}; need at least {need} distinct ones to train on "
            f"{min_train} and hold {min_heldout} out for evaluation; add notes"
            + _one_note_hint(examples)
        )

    target = min(max(min_heldout, round(heldout_fraction * n)), n - min_train)
    salt = _SPLIT_DOMAIN + seed.to_bytes(8, "little")
    ranked = sorted(groups, key=lambda key: (hashlib.sha256(salt + key).digest(), key))
    held: set[int] = set()
    for key in ranked:
        if len(held) >= target:
            break
        members = groups[key]
        if len(held) + len(members) <= n - min_train:  # a big duplicate group may not fit
            held.update(members)
    if len(held) < min_heldout:  # only when duplicates crowd out every other choice
        raise DataError(
            f"got {n} notes but too many are copies of one another to hold {min_heldout} "
            f"out and keep {min_train} to train on; remove duplicates or add notes"
        )
    train = [e for i, e in enumerate(examples) if i not in held]
    heldout = [e for i, e in enumerate(examples) if i in held]
    return train, heldout


def _one_note_hint(examples: Sequence[Example]) -> str:
    """Why a file may have read as too few notes, when it looks like a list of lines."""
    lines = max((e.text.count("\n") + 1 for e in examples if e.text is not None), default=1)
    if lines < 2:
        return ""
    return (
        f" (a note here has {lines} lines: notes are separated by blank lines; for one "
        "note per line pass --split lines, split='lines')"
    )


# ---------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class TokenBlocks:
    """Packed training blocks: every row is ``seq_len`` tokens of the concatenated stream.

    ``labels`` equal ``input_ids`` on real tokens and ``-100`` on padding; the model
    shifts them itself, as Hugging Face causal LMs do.

    Examples
    --------
    >>> ids = torch.arange(8).reshape(2, 4)
    >>> blocks = TokenBlocks(ids, torch.ones_like(ids), ids.clone())
    >>> len(blocks), blocks.num_tokens
    (2, 8)
    """

    input_ids: torch.Tensor  # (N, T) long
    attention_mask: torch.Tensor  # (N, T) long, 0 on padding
    labels: torch.Tensor  # (N, T) long, -100 where no loss

    def __post_init__(self) -> None:
        shape = tuple(self.input_ids.shape)
        if len(shape) != 2:
            raise SpecError(f"token blocks: input_ids must be 2-D (N, T), got shape {shape}")
        for name in ("attention_mask", "labels"):
            other = tuple(getattr(self, name).shape)
            if other != shape:
                raise SpecError(f"token blocks: {name} has shape {other}, input_ids {shape}")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __repr__(self) -> str:  # the tensors themselves would flood a log
        return f"TokenBlocks(blocks={len(self)}, seq_len={self.seq_len}, tokens={self.num_tokens})"

    @property
    def seq_len(self) -> int:
        """Tokens per block, ``T``."""
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        """Tokens that carry a label (all real tokens; padding carries none)."""
        return int((self.labels != IGNORE_INDEX).sum())

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[TokenBlocks]:
        """Yield batches of ``batch_size`` blocks; the last one may be smaller.

        Parameters
        ----------
        batch_size
            Blocks per batch, at least 1.
        shuffle
            Visit blocks in a random order drawn from ``generator`` (same generator state,
            same order), else in stored order.
        generator
            Source of the shuffle; ``None`` uses torch's global generator.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise SpecError(f"batch_size must be a positive integer, got {batch_size!r}")
        import torch

        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield TokenBlocks(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])


def encode_blocks(
    examples: Sequence[Example],
    tokenizer: Any,
    seq_len: int = 128,
    *,
    train_on: TrainOn = "completion",
) -> TokenBlocks:
    """Tokenize examples, pack them into one stream and cut it into ``seq_len`` blocks.

    A note becomes its tokens (with whatever special tokens the tokenizer adds by default,
    so a BOS only where the model expects one) followed by EOS, so the model learns
    where a note ends; a note with a ``prompt`` is the prompt's tokens, then the
    completion's. A conversation is rendered with the tokenizer's chat template, which
    supplies its own markers. The last block is padded: pad id, attention 0 and label
    -100, so padding never carries loss.

    With ``train_on="completion"`` (TRL's completion-only and assistant-only loss) the
    prompt of a note and every conversation turn but the assistant's replies after the
    prompt (with their end-of-turn marker) are labelled -100: the model reads them and
    learns only what the person wrote back. Blocks left with no label are dropped.

    Parameters
    ----------
    examples
        Notes and conversations, e.g. one side of :func:`split_examples`.
    tokenizer
        A Hugging Face tokenizer; conversations need one with a chat template.
    seq_len
        Tokens per block, at least 8.
    train_on
        ``"completion"`` or ``"all"`` (every token carries loss).

    Returns
    -------
    TokenBlocks
        ``ceil(total_tokens / seq_len)`` blocks, less those without a label.

    Examples
    --------
    >>> from transformers import AutoTokenizer  # doctest: +SKIP
    >>> tok = AutoTokenizer.from_pretrained("path/to/model")  # doctest: +SKIP
    >>> encode_blocks([Example(text="hello")], tok, seq_len=16).input_ids.shape  # doctest: +SKIP
    torch.Size([1, 16])
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < _MIN_SEQ_LEN:
        raise SpecError(f"seq_len must be an integer >= {_MIN_SEQ_LEN}, got {seq_len!r}")
    if train_on not in TRAIN_ON:
        raise SpecError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if not examples:
        raise DataError("no examples to encode; read some notes first")
    eos = tokenizer.eos_token_id
    if eos is None and any(e.text is not None for e in examples):
        raise DataError(
            "the tokenizer has no EOS token, so notes would run into one another; "
            "use the base model's own tokenizer"
        )

    # Every example becomes segments (text, adds special tokens, carries loss); all
    # segments are tokenized in two batched calls, then laid out in example order.
    segments = [_segments(e, tokenizer, train_on) for e in examples]
    flat = [seg for segs in segments for seg in segs]
    with_special = iter(
        _tokenize(tokenizer, [t for t, sp, _ in flat if sp], add_special_tokens=True)
    )
    without = iter(
        _tokenize(tokenizer, [t for t, sp, _ in flat if not sp], add_special_tokens=False)
    )
    stream: list[int] = []
    targets: list[int] = []
    for example, segs in zip(examples, segments, strict=True):
        for _, special, trained in segs:
            ids = next(with_special) if special else next(without)
            stream.extend(ids)
            targets.extend(ids if trained else [IGNORE_INDEX] * len(ids))
        if example.text is not None and (not stream or stream[-1] != eos):
            stream.append(eos)  # some tokenizers already append EOS
            targets.append(eos)

    import torch

    n_blocks = math.ceil(len(stream) / seq_len)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos if eos is not None else 0
    total = n_blocks * seq_len
    input_ids = torch.full((total,), int(pad), dtype=torch.long)
    input_ids[: len(stream)] = torch.tensor(stream, dtype=torch.long)  # (L,)
    attention = torch.zeros(total, dtype=torch.long)
    attention[: len(stream)] = 1
    labels = torch.full((total,), IGNORE_INDEX, dtype=torch.long)
    labels[: len(stream)] = torch.tensor(targets, dtype=torch.long)
    input_ids, attention, labels = (
        t.view(n_blocks, seq_len)
        for t in (input_ids, attention, labels)  # (N, T)
    )
    # The model predicts label t from tokens < t, so a block's first label never counts.
    keep = (labels[:, 1:] != IGNORE_INDEX).any(dim=1)  # (N,)
    if not bool(keep.any()):
        raise DataError(
            "nothing to learn from: every token is part of a prompt (no completion or "
            "assistant reply); add replies, or train on all tokens (--train-on all, "
            "train_on='all')"
        )
    return TokenBlocks(input_ids[keep], attention[keep], labels[keep])


def encode_notes(
    examples: Sequence[Example],
    tokenizer: Any,
    max_len: int = 256,
    *,
    train_on: TrainOn = "completion",
) -> TokenBlocks:
    """One row per example, padded to the longest (at most ``max_len`` tokens).

    Packed blocks (:func:`encode_blocks`) let a note's loss lean on the notes before it
    in the stream; scoring each note alone is how a user meets the model (a fresh
    context), and the two rank methods differently when notes are short. Tokens and
    labels are exactly those :func:`encode_blocks` would pack for the note; a longer
    note is cut.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < _MIN_SEQ_LEN:
        raise SpecError(f"max_len must be an integer >= {_MIN_SEQ_LEN}, got {max_len!r}")
    if not examples:
        raise DataError("no examples to encode; read some notes first")
    rows = [encode_blocks([e], tokenizer, seq_len=max_len, train_on=train_on) for e in examples]
    # encode_blocks pads each note to a whole block; keep its first block (cut long notes).
    real = [r.attention_mask[0].bool() for r in rows]
    ids = [r.input_ids[0][m] for r, m in zip(rows, real, strict=True)]
    targets = [r.labels[0][m] for r, m in zip(rows, real, strict=True)]
    import torch

    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(ids), width), int(pad or 0), dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, target) in enumerate(zip(ids, targets, strict=True)):
        input_ids[i, : len(row)] = row
        attention[i, : len(row)] = 1
        labels[i, : len(row)] = target
    return TokenBlocks(input_ids, attention, labels)  # (N, W)


def _segments(example: Example, tokenizer: Any, train_on: TrainOn) -> list[tuple[str, bool, bool]]:
    """``(text, add special tokens, carries loss)`` pieces of one example, in order."""
    everything = train_on == "all"
    if example.text is not None:
        if example.prompt is None:
            return [(example.text, True, True)]
        return [(example.prompt, True, everything), (example.text, False, True)]
    assert example.messages is not None
    full = _render_chat(example, tokenizer, example.messages)
    if everything:
        return [(full, False, True)]
    spans = _reply_spans(example, tokenizer, full)
    if spans is None:
        return [(full, False, True)]
    pieces: list[tuple[str, bool, bool]] = []
    pos = 0
    for start, end in spans:
        pieces += [(full[pos:start], False, False), (full[start:end], False, True)]
        pos = end
    pieces.append((full[pos:], False, False))
    return [p for p in pieces if p[0]]


def _reply_spans(example: Example, tokenizer: Any, full: str) -> list[tuple[int, int]] | None:
    """Character spans of the trained assistant replies in ``full``; None if unknowable.

    A reply's span runs from the end of the conversation before it rendered with the
    generation prompt to the end of the conversation up to it (so it includes the
    end-of-turn marker). Templates that rewrite earlier turns as the chat grows give
    no stable prefix; such a conversation is trained on all its tokens, with a warning.
    """
    assert example.messages is not None
    messages = example.messages
    spans: list[tuple[int, int]] = []
    for i, (role, _) in enumerate(messages):
        if role != "assistant" or i < example.prompt_messages:
            continue
        try:
            before = _render_chat(example, tokenizer, messages[:i], generation_prompt=True)
            upto = _render_chat(example, tokenizer, messages[: i + 1])
        except DataError:
            before = upto = "\x00"  # the template refuses a partial chat: not prefix-stable
        if not (upto.startswith(before) and full.startswith(upto)):
            logger.warning(
                "%s: the chat template does not render this conversation turn by turn, so "
                "all of it carries loss, prompts included",
                example.source or "a conversation",
            )
            return None
        spans.append((len(before), len(upto)))
    return spans


def _render_chat(
    example: Example,
    tokenizer: Any,
    messages: Sequence[tuple[str, str]],
    *,
    generation_prompt: bool = False,
) -> str:
    where = example.source or "a conversation"
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: this tokenizer has no chat template, so conversations cannot be "
            'rendered; use a chat (instruct) base model or write plain notes ({"text": ...})'
        )
    turns = [{"role": role, "content": content} for role, content in messages]
    try:
        rendered = tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # a template may refuse e.g. two user turns in a row
        raise DataError(
            f"{where}: the chat template rejected this conversation ({exc}); "
            "alternate user and assistant turns"
        ) from None
    if not isinstance(rendered, str):
        raise DataError(f"{where}: the chat template did not render to text")
    return rendered


def _tokenize(tokenizer: Any, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    # verbose=False: blocks are cut here, so "longer than the model's maximum" is expected.
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)
    return [list(ids) for ids in encoded["input_ids"]]
