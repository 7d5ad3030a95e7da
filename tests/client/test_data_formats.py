"""The dataset shapes users already have, each read from a real file (#16 items 4-5)."""

from __future__ import annotations

import csv
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from lorafleet.client.data import (
    IGNORE_INDEX,
    Example,
    encode_blocks,
    examples_from_records,
    read_examples,
    to_examples,
)
from lorafleet.protocols.errors import DataError


def _jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- shapes

_SHAPES: list[tuple[str, dict[str, Any], Example]] = [
    # (id, one record as a user's export has it, the example it must read as)
    ("text", {"text": "Pixel sleeps."}, Example(text="Pixel sleeps.")),
    (
        "trl prompt/completion",
        {"prompt": "Where does Pixel sleep?", "completion": " On the radiator."},
        Example(text=" On the radiator.", prompt="Where does Pixel sleep?"),
    ),
    (
        "trl conversational prompt/completion",
        {
            "prompt": [{"role": "user", "content": "Tuesday?"}],
            "completion": [{"role": "assistant", "content": "Climbing with Jonas."}],
        },
        Example(
            messages=(("user", "Tuesday?"), ("assistant", "Climbing with Jonas.")),
            prompt_messages=1,
        ),
    ),
    (
        "alpaca",
        {"instruction": "Greet Tomas.", "input": "It is morning.", "output": "Morning, Tomas!"},
        Example(
            messages=(("user", "Greet Tomas.\n\nIt is morning."), ("assistant", "Morning, Tomas!")),
            prompt_messages=1,
        ),
    ),
    (
        "alpaca without input",
        {"instruction": "Greet Tomas.", "input": "", "output": "Hi!", "text": "ignored"},
        Example(messages=(("user", "Greet Tomas."), ("assistant", "Hi!")), prompt_messages=1),
    ),
    (
        "sharegpt",
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Cat?"},
                {"from": "gpt", "value": "Pixel."},
            ]
        },
        Example(messages=(("system", "Be brief."), ("user", "Cat?"), ("assistant", "Pixel."))),
    ),
    (
        "openai messages with tools",
        {
            "messages": [
                {"role": "developer", "content": "You are Maya's assistant."},
                {"role": "user", "content": [{"type": "text", "text": "Tide today?"}]},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                {"role": "tool", "tool_call_id": "1", "content": "low 14:02"},
                {"role": "assistant", "content": "Low tide at two."},
            ],
            "tools": [{"type": "function"}],
        },
        Example(
            messages=(
                ("system", "You are Maya's assistant."),
                ("user", "Tide today?"),
                ("assistant", "Low tide at two."),
            )
        ),
    ),
]


@pytest.mark.parametrize(
    ("record", "expected"), [s[1:] for s in _SHAPES], ids=[s[0] for s in _SHAPES]
)
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_every_shape_reads_from_a_real_jsonl_and_json_file(
    tmp_path: Path, record: dict[str, Any], expected: Example, suffix: str
) -> None:
    # Prepare
    file = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        _jsonl(file, [record, record])
    else:
        file.write_text(json.dumps([record, record], indent=2), encoding="utf-8")

    # Execute
    examples = read_examples(file)

    # Assert: same content, each example naming its own line or record
    assert [e.content_key() for e in examples] == [expected.content_key()] * 2
    where = ["1", "2"] if suffix == ".jsonl" else ["record 1", "record 2"]
    assert [e.source for e in examples] == [f"{file}:{w}" for w in where]


@pytest.mark.parametrize(("suffix", "delimiter"), [(".csv", ","), (".tsv", "\t")])
def test_a_table_reads_rows_by_shape_or_by_a_named_text_column(
    tmp_path: Path, suffix: str, delimiter: str
) -> None:
    # Prepare: a spreadsheet export, one cell with the delimiter and a line break
    file = tmp_path / f"diary{suffix}"
    with file.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["date", "body", "instruction", "output"])
        writer.writerow(["mon", "Climbed, then soup.\nTired.", "Plan?", "Rest."])
        writer.writerow(["tue", "Pixel on the radiator.", "Cat?", "Asleep."])

    # Execute
    by_shape = read_examples(file)
    by_column = read_examples(file, text_field="body")

    # Assert
    assert [e.messages for e in by_shape] == [
        (("user", "Plan?"), ("assistant", "Rest.")),
        (("user", "Cat?"), ("assistant", "Asleep.")),
    ]
    assert [e.text for e in by_column] == ["Climbed, then soup.\nTired.", "Pixel on the radiator."]
    assert [e.source for e in by_column] == [f"{file}:3", f"{file}:4"]


def test_parquet_rows_read_like_records(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Prepare
    file = tmp_path / "chats.parquet"
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}
    ] * 2
    pq.write_table(pa.Table.from_pylist(rows), file)

    # Execute / Assert
    examples = read_examples(file)
    assert [e.messages for e in examples] == [(("user", "Hi"), ("assistant", "Hey"))] * 2
    assert examples[1].source == f"{file}:row 2"


def test_a_parquet_file_written_by_datasets_reads_like_its_rows(tmp_path: Path) -> None:
    from datasets import Dataset

    # Prepare: the Alpaca shape, exported the way a Hugging Face user would
    rows = [
        {"instruction": "Name the cat.", "input": "", "output": "Pixel."},
        {"instruction": "Where?", "input": "The cat.", "output": "On the radiator."},
    ]
    file = tmp_path / "alpaca.parquet"
    Dataset.from_list(rows).to_parquet(str(file))

    # Execute
    examples = read_examples(file)

    # Assert: the same examples as the rows themselves
    assert [e.messages for e in examples] == [e.messages for e in examples_from_records(rows)]
    assert examples[0].messages == (("user", "Name the cat."), ("assistant", "Pixel."))


def test_parquet_without_pyarrow_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: this process cannot import pyarrow, as on a device without the extra
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    file = tmp_path / "chats.parquet"
    file.write_bytes(b"PAR1\x00PAR1")

    # Execute / Assert
    with pytest.raises(DataError, match=re.escape(f"{file}: reading Parquet needs pyarrow")):
        read_examples(file)


def test_a_damaged_parquet_file_is_one_error_naming_it(tmp_path: Path) -> None:
    file = tmp_path / "cut.parquet"
    file.write_bytes(b"PAR1\x00PAR1")

    with pytest.raises(DataError, match=re.escape(f"{file}: not a readable Parquet file")):
        read_examples(file)


def test_a_dataset_object_or_any_iterable_of_dicts_is_read(tmp_path: Path) -> None:
    # Prepare: what datasets.Dataset.to_list() (or iterating a Dataset) gives
    rows = [
        {"prompt": "Tuesday?", "completion": " Climbing."},
        {"text": "A plain note."},
    ]

    # Execute
    examples = examples_from_records(iter(rows))

    # Assert
    assert [(e.prompt, e.text) for e in examples] == [
        ("Tuesday?", " Climbing."),
        (None, "A plain note."),
    ]
    with pytest.raises(DataError, match=r"^record 2: .*none of the known fields"):
        examples_from_records([{"text": "ok"}, {"body": "?"}])


def test_a_real_hugging_face_dataset_is_taken_as_it_is(tmp_path: Path) -> None:
    from datasets import Dataset

    # Prepare: a real Dataset with conversational prompt/completion columns
    ds = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "Where does Pixel sleep?"}],
                "completion": [{"role": "assistant", "content": "On the radiator."}],
            },
            {
                "prompt": [{"role": "user", "content": "And Turnip?"}],
                "completion": [{"role": "assistant", "content": "By the door."}],
            },
        ]
    )

    # Execute
    examples = to_examples(ds)

    # Assert: read as the same rows in a plain list
    assert examples == to_examples(ds.to_list())
    assert [e.messages[-1] for e in examples if e.messages] == [
        ("assistant", "On the radiator."),
        ("assistant", "By the door."),
    ]


_BAD_RECORDS = [
    # (id, record, pattern)
    (
        "mixed prompt/completion",
        {"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]},
        r'"prompt" and "completion" must both be strings or both be lists',
    ),
    (
        "sharegpt unknown speaker",
        {"conversations": [{"from": "narrator", "value": "x"}]},
        r"conversations message 1 has unknown from 'narrator'",
    ),
    (
        "only tool turns",
        {"messages": [{"role": "tool", "content": "42"}]},
        r'"messages" holds only tool turns',
    ),
    (
        "image part",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        r"non-text content parts",
    ),
    ("alpaca output", {"instruction": "a", "output": 3}, r'"output" must be a string'),
    ("preference data", {"prompt": "a", "chosen": "b"}, r"none of the known fields"),
]


@pytest.mark.parametrize(
    ("record", "pattern"), [b[1:] for b in _BAD_RECORDS], ids=[b[0] for b in _BAD_RECORDS]
)
def test_a_bad_record_is_one_line_naming_file_line_and_field(
    tmp_path: Path, record: dict[str, Any], pattern: str
) -> None:
    file = _jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, record])

    with pytest.raises(DataError) as info:
        read_examples(file)

    message = str(info.value)
    assert message.startswith(f"{file}:2: ") and "\n" not in message
    assert re.search(pattern, message), message


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("d.json", '{"text": "a"}', r"expected a JSON array of records, got dict"),
        ("d.json", '[{"text": "a"},\n {"text": ]', r"not valid JSON .* at line 2"),
        ("d.csv", 'body\n"unclosed\n', r"d\.csv:\d+: not valid CSV"),
        ("d.csv", "body\na,b\n", r"d\.csv:2: this row has more cells than the header"),
        ("d.csv", "body\n", r"no records found"),
    ],
)
def test_bad_structured_files_are_one_line(
    tmp_path: Path, name: str, content: str, pattern: str
) -> None:
    file = tmp_path / name
    file.write_text(content, encoding="utf-8")

    with pytest.raises(DataError) as info:
        read_examples(file, text_field="body" if name.endswith("csv") else None)

    assert str(file) in str(info.value) and re.search(pattern, str(info.value)), info.value


def test_a_missing_text_column_names_the_columns_there(tmp_path: Path) -> None:
    file = tmp_path / "d.csv"
    file.write_text("date,note\nmon,hi\n", encoding="utf-8")

    with pytest.raises(DataError, match=r"d\.csv:2: no field 'body' \(found 'date', 'note'\)"):
        read_examples(file, text_field="body")


# ---------------------------------------------------------------------------- .txt split


def test_a_txt_with_one_note_per_line_is_detected_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a list of notes, one a line, no blank line (it used to read as one note)
    file = tmp_path / "notes.txt"
    file.write_text("Walked Turnip.\nSoup for lunch.\nCalled Tomas.\n", encoding="utf-8")

    # Execute
    with caplog.at_level(logging.WARNING):
        auto = read_examples(file)
    lines = read_examples(file, split="lines")
    whole = read_examples(file, split="paragraphs")

    # Assert
    assert [e.text for e in auto] == ["Walked Turnip.", "Soup for lunch.", "Called Tomas."]
    assert [e.source for e in auto] == [f"{file}:1", f"{file}:2", f"{file}:3"]
    assert "each line is read as one note" in caplog.text and "--split paragraphs" in caplog.text
    assert lines == auto
    assert [e.text for e in whole] == ["Walked Turnip.\nSoup for lunch.\nCalled Tomas."]


def test_paragraph_notes_and_folders_are_not_split_into_lines(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("Line one\nline two\n\nSecond note\n", encoding="utf-8")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.md").write_text("# Monday\nClimbed.\n", encoding="utf-8")

    assert [e.text for e in read_examples(file)] == ["Line one\nline two", "Second note"]
    assert [e.text for e in read_examples(tmp_path / "dir")] == ["# Monday\nClimbed."]


# ---------------------------------------------------------------------------- loss masks


def _trained_text(blocks: Any, tokenizer: Any) -> str:
    labels = blocks.labels.flatten()
    return str(tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()))


def test_completion_only_loss_masks_the_prompt_of_a_pair(tiny_tokenizer: Any) -> None:
    # Prepare
    pair = Example(text=" On the radiator.", prompt="Where does Pixel sleep?")

    # Execute
    masked = encode_blocks([pair], tiny_tokenizer, seq_len=64)
    everything = encode_blocks([pair], tiny_tokenizer, seq_len=64, train_on="all")

    # Assert: the model reads the prompt either way; only the completion (and EOS) trains
    assert masked.input_ids.tolist() == everything.input_ids.tolist()
    assert _trained_text(masked, tiny_tokenizer) == " On the radiator.</s>"
    assert "Where does Pixel sleep?" in _trained_text(everything, tiny_tokenizer)


def test_chat_loss_is_on_assistant_replies_after_the_prompt(tiny_tokenizer: Any) -> None:
    # Prepare: system and user turns, an earlier reply inside the prompt, one completion
    chat = Example(
        messages=(
            ("system", "Be brief."),
            ("user", "Cat?"),
            ("assistant", "Pixel."),
            ("user", "Where?"),
            ("assistant", "Radiator."),
        )
    )
    pair = Example(messages=chat.messages, prompt_messages=3)  # type: ignore[arg-type]

    # Execute
    chat_blocks = encode_blocks([chat], tiny_tokenizer, seq_len=128)
    pair_blocks = encode_blocks([pair], tiny_tokenizer, seq_len=128)
    all_blocks = encode_blocks([chat], tiny_tokenizer, seq_len=128, train_on="all")

    # Assert: replies with their end-of-turn marker; nothing of the prompt turns
    assert _trained_text(chat_blocks, tiny_tokenizer) == "Pixel.<|im_end|>\nRadiator.<|im_end|>\n"
    assert _trained_text(pair_blocks, tiny_tokenizer) == "Radiator.<|im_end|>\n"
    assert all_blocks.num_tokens == int(all_blocks.attention_mask.sum())
    assert chat_blocks.input_ids.tolist() == all_blocks.input_ids.tolist()


def test_data_with_nothing_to_learn_says_how_to_train_on_everything(tiny_tokenizer: Any) -> None:
    only_prompt = Example(messages=(("system", "Be brief."), ("user", "Cat?")))

    with pytest.raises(DataError, match=r"nothing to learn from.*--train-on all"):
        encode_blocks([only_prompt], tiny_tokenizer, seq_len=32)
    assert len(encode_blocks([only_prompt], tiny_tokenizer, seq_len=32, train_on="all")) == 1


def test_pairs_and_notes_split_on_their_whole_content() -> None:
    # A pair differs from a note with the same completion, and from another prompt.
    note = Example(text="Radiator.")
    keys = {
        note.content_key(),
        Example(text="Radiator.", prompt="Where?").content_key(),
        Example(text="Radiator.", prompt="Why?").content_key(),
    }
    assert len(keys) == 3
    assert note.content_key() == b"text\x00Radiator."  # old notes keep their split side
