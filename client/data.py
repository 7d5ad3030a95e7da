"""A user's personal training data: reading notes, splitting off a held-out set, packing tokens.

Personal data is whatever a person already has: a text file of notes separated by blank
lines, a Markdown file, a JSON Lines export of notes or chats, or a folder of those. This
module turns it into :class:`Example` values, splits them into train and held-out sets
in a way that stays put as notes are added, and packs them into fixed-length token
blocks for causal-LM training. Every mistake in the data raises one
:class:`~lorafleet.protocols.errors.DataError` line naming the file (and the line or byte)
and the fix, because the person reading it is usually not the person who wrote the code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from lorafleet.protocols.errors import DataError, LorafleetError, SpecError

__all__ = [
    "ROLES",
    "Example",
    "TokenBlocks",
    "demo_notes_path",
    "encode_blocks",
    "encode_notes",
    "read_examples",
    "split_examples",
]

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
"""Roles a conversation message may have (the ones every chat template understands)."""

IGNORE_INDEX = -100
"""Label of positions that carry no loss (PyTorch's ``cross_entropy`` default)."""

_NOTE_SUFFIXES = (".txt", ".md")
_JSONL_SUFFIX = ".jsonl"
_SUFFIXES = (*_NOTE_SUFFIXES, _JSONL_SUFFIX)
_INLINE_SPACE = re.compile(r"[^\S\n]+")  # whitespace other than newline
_MIN_SEQ_LEN = 8
_SPLIT_DOMAIN = b"lorafleet/split/v1\x00"
_FORMAT_HINT = (
    'each line must be one JSON object, {"text": "..."} or '
    '{"messages": [{"role": "user", "content": "..."}, ...]}'
)


@dataclass(frozen=True)
class Example:
    """One unit of personal data: a note (plain text) or a conversation.

    Exactly one of ``text`` and ``messages`` is set. ``source`` says where the example
    came from (``file:line``) so that errors found later, while encoding, can still
    point at the line to fix; it takes no part in the train/held-out split.

    Examples
    --------
    >>> Example(text="Walked Turnip along the harbour.").text
    'Walked Turnip along the harbour.'
    >>> Example(messages=[("user", "hi"), ("assistant", "hello")]).messages
    (('user', 'hi'), ('assistant', 'hello'))
    """

    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        where = self.source or "example"
        if (self.text is None) == (self.messages is None):
            raise DataError(f"{where}: set exactly one of text (a note) or messages (a chat)")
        if self.text is not None:
            if not isinstance(self.text, str):
                raise DataError(f"{where}: text must be a string, got {type(self.text).__name__}")
            if not self.text.strip():
                raise DataError(f"{where}: the note is empty; write some text or remove it")
            return
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
        object.__setattr__(self, "messages", tuple(pairs))

    def content_key(self) -> bytes:
        """Canonical bytes of the content (not the source); equal content, equal key."""
        if self.text is not None:
            return b"text\x00" + self.text.encode()
        assert self.messages is not None
        return b"chat\x00" + json.dumps(self.messages, ensure_ascii=False).encode()


# ---------------------------------------------------------------------------- reading


def read_examples(path: str | Path) -> list[Example]:
    """Read personal data from a file or a folder of files.

    Parameters
    ----------
    path
        One of

        - a ``.txt`` or ``.md`` file: notes separated by one or more blank lines. Inside a
          note, runs of spaces and tabs become one space and line breaks are kept. In a
          ``.txt`` file, lines starting with ``#`` at the start of a note are comments.
        - a ``.jsonl`` file: one JSON object per line, ``{"text": "..."}`` or
          ``{"messages": [{"role": "user", "content": "..."}, ...]}`` with roles
          ``system``, ``user`` or ``assistant``; other keys are ignored and blank lines
          skipped. Texts are kept exactly as written.
        - a folder: every ``.txt``, ``.md`` and ``.jsonl`` file under it, recursively, in
          sorted path order; hidden files and folders are skipped.

    Returns
    -------
    list[Example]
        In file order; each example's ``source`` is ``file:line``.

    Raises
    ------
    DataError
        The path is missing, a file is empty, not UTF-8, not valid JSON Lines, or of an
        unsupported type; the message names the file, the place and the fix.

    Examples
    --------
    >>> examples = read_examples(demo_notes_path())
    >>> len(examples) > 100, examples[0].text is not None
    (True, True)
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder; check the path to your notes")
    if p.is_dir():
        return _read_dir(p)
    return _read_file(p)


def _read_dir(folder: Path) -> list[Example]:
    found: list[Path] = []
    skipped: list[Path] = []
    for candidate in sorted(folder.rglob("*")):
        rel = candidate.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not candidate.is_file():
            continue
        (found if candidate.suffix.lower() in _SUFFIXES else skipped).append(candidate)
    if skipped:
        logger.warning(
            "skipping %d file(s) under %s that are not .txt, .md or .jsonl: %s",
            len(skipped),
            folder,
            ", ".join(str(s.relative_to(folder)) for s in skipped[:5])
            + (" ..." if len(skipped) > 5 else ""),
        )
    if not found:
        raise DataError(
            f"{folder}: no .txt, .md or .jsonl files in this folder; put your notes in one"
        )
    examples: list[Example] = []
    for file in found:
        examples.extend(_read_file(file))
    return examples


def _read_file(file: Path) -> list[Example]:
    suffix = file.suffix.lower()
    if suffix not in _SUFFIXES:
        raise DataError(
            f"{file}: unsupported file type {file.suffix or '(no extension)'!r}; use .txt or .md "
            "(notes separated by blank lines) or .jsonl (one JSON object per line)"
        )
    text = _read_utf8(file)
    examples = _parse_jsonl(file, text) if suffix == _JSONL_SUFFIX else _parse_notes(file, text)
    if not examples:
        what = "JSON lines" if suffix == _JSONL_SUFFIX else "notes"
        raise DataError(
            f"{file}: no {what} found (the file is empty or holds only "
            f"{'blank lines' if suffix == _JSONL_SUFFIX else 'comments and blank lines'}); "
            "add notes or remove the file"
        )
    return examples


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


def _parse_notes(file: Path, text: str) -> list[Example]:
    """Split notes on blank lines; in a .txt file, leading ``#`` lines of a note are comments."""
    comments = file.suffix.lower() == ".txt"
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

    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = _INLINE_SPACE.sub(" ", raw).strip()
        if line:
            block.append((lineno, line))
        else:
            flush()
    flush()
    return examples


def _parse_jsonl(file: Path, text: str) -> list[Example]:
    examples: list[Example] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); {_FORMAT_HINT}"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{where}: expected a JSON object, got {type(obj).__name__}; {_FORMAT_HINT}"
            )
        has_text, has_messages = "text" in obj, "messages" in obj
        if has_text == has_messages:
            which = 'both "text" and' if has_text else 'neither "text" nor'
            raise DataError(f'{where}: object has {which} "messages"; {_FORMAT_HINT}')
        if has_text:
            if not isinstance(obj["text"], str):
                raise DataError(f'{where}: "text" must be a string; {_FORMAT_HINT}')
            examples.append(Example(text=obj["text"], source=where))
            continue
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f'{where}: "messages" must be a non-empty list; {_FORMAT_HINT}')
        pairs: list[tuple[str, str]] = []
        for i, message in enumerate(messages, start=1):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DataError(
                    f'{where}: message {i} must be an object with "role" and "content"; '
                    + _FORMAT_HINT
                )
            pairs.append((message["role"], message["content"]))
        examples.append(Example(messages=tuple(pairs), source=where))
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
            f"{min_train} and hold {min_heldout} out for evaluation; add notes or lower "
            "min_train/min_heldout"
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
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield TokenBlocks(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])


def encode_blocks(examples: Sequence[Example], tokenizer: Any, seq_len: int = 128) -> TokenBlocks:
    """Tokenize examples, pack them into one stream and cut it into ``seq_len`` blocks.

    A note becomes its tokens (with whatever special tokens the tokenizer adds by default,
    so a BOS only where the model expects one) followed by EOS, so the model learns
    where a note ends. A conversation is rendered with the tokenizer's chat template,
    which supplies its own markers. The last block is padded: pad id, attention 0 and
    label -100, so padding never carries loss.

    Parameters
    ----------
    examples
        Notes and conversations, e.g. one side of :func:`split_examples`.
    tokenizer
        A Hugging Face tokenizer; conversations need one with a chat template.
    seq_len
        Tokens per block, at least 8.

    Returns
    -------
    TokenBlocks
        ``ceil(total_tokens / seq_len)`` blocks.

    Examples
    --------
    >>> from transformers import AutoTokenizer  # doctest: +SKIP
    >>> tok = AutoTokenizer.from_pretrained("path/to/model")  # doctest: +SKIP
    >>> encode_blocks([Example(text="hello")], tok, seq_len=16).input_ids.shape  # doctest: +SKIP
    torch.Size([1, 16])
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < _MIN_SEQ_LEN:
        raise SpecError(f"seq_len must be an integer >= {_MIN_SEQ_LEN}, got {seq_len!r}")
    if not examples:
        raise DataError("no examples to encode; read some notes first")

    texts: list[str] = []  # notes, tokenized with the tokenizer's default special tokens
    chats: list[str] = []  # rendered conversations, whose template adds the special tokens
    for example in examples:
        if example.text is not None:
            texts.append(example.text)
        else:
            chats.append(_render_chat(example, tokenizer))

    eos = tokenizer.eos_token_id
    if texts and eos is None:
        raise DataError(
            "the tokenizer has no EOS token, so notes would run into one another; "
            "use the base model's own tokenizer"
        )
    text_ids = _tokenize(tokenizer, texts, add_special_tokens=True)
    chat_ids = _tokenize(tokenizer, chats, add_special_tokens=False)

    stream: list[int] = []
    t_iter, c_iter = iter(text_ids), iter(chat_ids)
    for example in examples:
        if example.text is not None:
            ids = next(t_iter)
            stream.extend(ids)
            if not ids or ids[-1] != eos:  # some tokenizers already append EOS
                stream.append(eos)
        else:
            stream.extend(next(c_iter))

    n_blocks = math.ceil(len(stream) / seq_len)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos if eos is not None else 0
    total = n_blocks * seq_len
    real = torch.tensor(stream, dtype=torch.long)  # (L,)
    input_ids = torch.full((total,), int(pad), dtype=torch.long)
    input_ids[: len(stream)] = real
    attention = torch.zeros(total, dtype=torch.long)
    attention[: len(stream)] = 1
    labels = torch.full((total,), IGNORE_INDEX, dtype=torch.long)
    labels[: len(stream)] = real
    return TokenBlocks(
        input_ids.view(n_blocks, seq_len),  # (N, T)
        attention.view(n_blocks, seq_len),
        labels.view(n_blocks, seq_len),
    )


def encode_notes(examples: Sequence[Example], tokenizer: Any, max_len: int = 256) -> TokenBlocks:
    """One row per example, padded to the longest (at most ``max_len`` tokens).

    Packed blocks (:func:`encode_blocks`) let a note's loss lean on the notes before it
    in the stream; scoring each note alone is how a user meets the model (a fresh
    context), and the two rank methods differently when notes are short. Tokens are
    exactly those :func:`encode_blocks` would pack for the note; a longer note is cut.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < _MIN_SEQ_LEN:
        raise SpecError(f"max_len must be an integer >= {_MIN_SEQ_LEN}, got {max_len!r}")
    if not examples:
        raise DataError("no examples to encode; read some notes first")
    rows = [encode_blocks([e], tokenizer, seq_len=max_len) for e in examples]
    # encode_blocks pads each note to a whole block; keep its first block (cut long notes).
    ids = [r.input_ids[0][r.attention_mask[0].bool()] for r in rows]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(ids), width), int(pad or 0), dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
        attention[i, : len(row)] = 1
        labels[i, : len(row)] = row
    return TokenBlocks(input_ids, attention, labels)  # (N, W)


def _render_chat(example: Example, tokenizer: Any) -> str:
    where = example.source or "a conversation"
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: this tokenizer has no chat template, so conversations cannot be "
            'rendered; use a chat (instruct) base model or write plain notes ({"text": ...})'
        )
    assert example.messages is not None
    messages = [{"role": role, "content": content} for role, content in example.messages]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
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
