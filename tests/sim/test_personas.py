"""Synthetic personas: reproducible, private facts stay private, folders round-trip."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from lorafleet.protocols.errors import DataError, SpecError
from lorafleet.sim.personas import (
    FACT_KEYS,
    STYLES,
    Persona,
    PersonaConfig,
    generate_notes,
    generate_personas,
    load_user_folders,
    write_user_folders,
)

# Facts drawn from large private vocabularies; the rest (pet kind, weekday, habit,
# food, commute) come from small lists that many users share.
DISTINCTIVE = ("partner", "friend", "colleague", "sibling", "pet", "town", "gym", "employer",
               "project", "cafe")  # fmt: skip

# The date header and sign-off of each style, so a note's body can be compared.
_HEADER = re.compile(
    r"^(\w{3} \d+ \w{3} — |\d\d/\d\d |\w+, \d+ \w+\. |\d{4}-\d\d-\d\d: |\w+\. |\d+ \w{3}\n)"
)
_SIGNOFF = re.compile(r"( xx| — \w+)$")


def _body(note: str) -> str:
    return _SIGNOFF.sub("", _HEADER.sub("", note, count=1))


def _mentions(value: str, text: str) -> bool:
    """Whole-word, case-insensitive: 'Ivo' is not in 'Ivonne', lowercase styles match."""
    return (
        re.search(r"(?<![\w-])" + re.escape(value.lower()) + r"(?![\w-])", text.lower()) is not None
    )


def _word_runs(text: str, longest: int) -> set[str]:
    """Every run of 1..longest consecutive words, lowercased and joined by one space."""
    words = re.findall(r"[\w-]+", text.lower())
    return {" ".join(words[i : i + n]) for n in range(1, longest + 1) for i in range(len(words))}


@pytest.fixture(scope="module")
def eight() -> list[Persona]:
    return generate_personas(PersonaConfig(num_users=8, seed=0))


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_users": 0}, "num_users"),
        ({"num_users": True}, "num_users"),
        ({"num_users": 2.0}, "num_users"),
        ({"notes_per_user": 1}, "notes_per_user"),
        ({"notes_per_user": 10_001}, "notes_per_user"),
        ({"heldout_fraction": 0.0}, "heldout_fraction"),
        ({"heldout_fraction": 1.0}, "heldout_fraction"),
        ({"heldout_fraction": "0.2"}, "heldout_fraction"),
        ({"notes_per_user": 4, "heldout_fraction": 0.1}, "holds out 0 notes"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_rejects_bad_values_naming_them(kwargs: dict[str, object], message: str) -> None:
    # Execute / Assert
    with pytest.raises(SpecError, match=message):
        PersonaConfig(**kwargs)  # type: ignore[arg-type]


def test_config_counts_split_notes_per_user() -> None:
    # Prepare
    config = PersonaConfig(notes_per_user=60, heldout_fraction=0.25)

    # Execute / Assert
    assert (config.num_train, config.num_heldout) == (45, 15)


# ---------------------------------------------------------------------------- generation


def test_personas_have_the_configured_shape(eight: list[Persona]) -> None:
    # Assert
    assert len(eight) == 8
    for i, p in enumerate(eight):
        assert re.fullmatch(rf"u{i:04d}-[0-9a-f]{{6}}", p.user_id)
        assert tuple(p.facts) == FACT_KEYS
        assert p.style in STYLES
        assert (len(p.train), len(p.heldout)) == (96, 24)
        assert len(set(p.train)) == 96 and len(set(p.heldout)) == 24


def test_same_seed_same_personas_and_other_seed_other_personas(eight: list[Persona]) -> None:
    # Execute
    again = generate_personas(PersonaConfig(num_users=8, seed=0))
    other = generate_personas(PersonaConfig(num_users=8, seed=1))

    # Assert
    assert again == eight
    assert all(a.user_id != b.user_id for a, b in zip(eight, other, strict=True))
    assert all(a.train != b.train for a, b in zip(eight, other, strict=True))
    assert sum(a.facts == b.facts for a, b in zip(eight, other, strict=True)) == 0


def test_user_i_does_not_depend_on_how_many_users(eight: list[Persona]) -> None:
    # Execute
    many = generate_personas(PersonaConfig(num_users=40, seed=0))

    # Assert
    assert many[:8] == eight


def test_more_notes_per_user_only_appends() -> None:
    # Execute
    few = generate_personas(PersonaConfig(num_users=3, notes_per_user=40))
    more = generate_personas(PersonaConfig(num_users=3, notes_per_user=200))

    # Assert: the first k training notes of a user are the same, so runs compare
    for a, b in zip(few, more, strict=True):
        assert a.facts == b.facts and a.style == b.style
        assert b.train[: len(a.train)] == a.train
        assert b.heldout[: len(a.heldout)] == a.heldout


def test_facts_recur_in_the_users_own_notes(eight: list[Persona]) -> None:
    # Assert: each distinctive fact shows up often enough to be learned from train, and
    # every note, held-out ones included, is about at least one of the user's facts
    telling = (*DISTINCTIVE, "habit", "food", "commute")
    for p in eight:
        for key in ("partner", "pet", "town", "project"):
            share = sum(_mentions(p.facts[key], n) for n in p.train) / len(p.train)
            assert share >= 0.1, (p.user_id, key, share)
        for note in (*p.train, *p.heldout):
            assert any(_mentions(p.facts[k], note) for k in telling), note


def test_private_facts_never_appear_in_other_users_notes() -> None:
    # Prepare: many users, so names and places collide if any shared text contains them
    users = generate_personas(PersonaConfig(num_users=300, notes_per_user=40, seed=3))
    values = {p.facts[k].lower() for p in users for k in DISTINCTIVE}
    assert max(len(v.split()) for v in values) <= 4  # _word_runs looks at runs up to 4

    # Execute: every private value found, as whole words, in a user's notes not their own
    leaks = [
        (value, p.user_id)
        for p in users
        for value in _word_runs("\n".join((*p.train, *p.heldout)), 4) & values
        if value not in {v.lower() for v in p.facts.values()}
    ]

    # Assert
    assert leaks == []


def test_heldout_notes_are_new_notes_not_copies_of_train(eight: list[Persona]) -> None:
    # Assert: even with the date header and sign-off removed, no held-out note repeats a
    # training note
    for p in eight:
        train_bodies = {_body(n) for n in p.train}
        assert not set(p.heldout) & set(p.train)
        assert not {_body(n) for n in p.heldout} & train_bodies, p.user_id


def test_styles_differ_across_users() -> None:
    # Execute
    users = generate_personas(PersonaConfig(num_users=60, notes_per_user=10))

    # Assert: every style is used, and a lowercase writer never capitalises
    assert {p.style for p in users} == set(STYLES)
    for p in users:
        if p.style in ("terse", "dreamy"):
            assert all(n == n.lower() for n in p.train)
        if p.style == "bullets":
            assert all("\n- " in n for n in p.train)
        if p.style == "log":
            assert all(n.endswith(" — " + p.facts["name"]) for n in p.train)


def test_notes_are_short_daily_notes(eight: list[Persona]) -> None:
    # Assert: roughly 20-50 tokens each, counting words as a stand-in for tokens
    words = [len(n.split()) for p in eight for n in (*p.train, *p.heldout)]
    assert 15 <= sum(words) / len(words) <= 40
    assert min(words) >= 4 and max(words) <= 80


def test_generate_notes_extends_a_persona_without_touching_its_heldout(
    eight: list[Persona],
) -> None:
    # Prepare
    p = eight[2]

    # Execute
    extra = generate_notes(2, 64, seed=0)

    # Assert: nested prefixes for cold-start curves, same persona, never a held-out note
    assert len(extra) == len(set(extra)) == 64
    assert generate_notes(2, 16, seed=0) == extra[:16]
    assert generate_notes(2, 16, seed=1) != extra[:16]
    assert not {_body(n) for n in extra} & {_body(n) for n in p.heldout}
    assert sum(_mentions(p.facts["pet"], n) for n in extra) >= 5
    assert generate_notes(2, 0) == []


@pytest.mark.parametrize(
    ("index", "n", "seed"), [(-1, 4, 0), (0, -1, 0), (0, 10_001, 0), (0, 4, -2), (True, 4, 0)]
)
def test_generate_notes_rejects_bad_arguments(index: int, n: int, seed: int) -> None:
    with pytest.raises(SpecError):
        generate_notes(index, n, seed=seed)


def test_a_thousand_users_are_quick_and_distinct() -> None:
    # Execute
    start = time.perf_counter()
    users = generate_personas(PersonaConfig(num_users=1000))
    elapsed = time.perf_counter() - start

    # Assert: a couple of seconds on a laptop core; generous for a busy CI machine
    assert elapsed < 10, elapsed
    assert len({p.user_id for p in users}) == 1000
    assert len({tuple(p.facts[k] for k in DISTINCTIVE) for p in users}) == 1000
    assert len({p.facts["town"] for p in users}) > 400
    assert len({p.facts["partner"] for p in users}) > 150
    assert max(Counter(p.style for p in users).values()) < 250


def test_module_import_does_not_import_torch() -> None:
    # Execute: a fresh interpreter, since this one may have torch loaded already
    code = "import sys, lorafleet.sim.personas; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    # Assert
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------- folders


def test_write_then_load_round_trips_through_read_examples(
    eight: list[Persona], tmp_path: Path
) -> None:
    # Prepare
    from lorafleet.client.data import read_examples

    # Execute
    root = write_user_folders(eight, tmp_path / "users")
    loaded = load_user_folders(root)

    # Assert
    assert [u.user_id for u in loaded] == [p.user_id for p in eight]
    for user, p in zip(loaded, eight, strict=True):
        assert [e.text for e in user.train] == list(p.train)
        assert [e.text for e in user.heldout] == list(p.heldout)
        assert [e.text for e in read_examples(root / p.user_id / "heldout.txt")] == list(p.heldout)
        meta = json.loads((root / p.user_id / "persona.json").read_text())
        assert meta["facts"] == dict(p.facts) and meta["style"] == p.style
    assert not [f for f in root.rglob("*") if f.name.startswith(".")]  # no temporaries left


def test_rewriting_the_same_users_overwrites_in_place(eight: list[Persona], tmp_path: Path) -> None:
    # Prepare
    root = write_user_folders(eight[:2], tmp_path / "users")

    # Execute
    write_user_folders(eight[:2], root)

    # Assert
    assert [u.user_id for u in load_user_folders(root)] == [p.user_id for p in eight[:2]]


def test_write_refuses_to_mix_users_of_another_run(eight: list[Persona], tmp_path: Path) -> None:
    # Prepare
    root = write_user_folders(eight[:2], tmp_path / "users")
    other = generate_personas(PersonaConfig(num_users=2, notes_per_user=10, seed=9))

    # Execute / Assert
    with pytest.raises(DataError, match="not these users' folders"):
        write_user_folders(other, root)
    assert len(load_user_folders(root)) == 2


def test_write_refuses_notes_that_would_not_read_back(tmp_path: Path) -> None:
    # Prepare
    bad = Persona("u1", {}, "plain", ("fine", "two\n\nnotes"), ("ok",))

    # Execute / Assert
    with pytest.raises(DataError, match="u1: train note 1"):
        write_user_folders([bad], tmp_path / "users")
    assert not (tmp_path / "users" / "u1").exists()


@pytest.mark.parametrize("user_id", ["../escape", "", ".hidden", "a/b"])
def test_persona_rejects_user_ids_that_are_not_folder_names(user_id: str) -> None:
    with pytest.raises(DataError, match="user_id"):
        Persona(user_id, {}, "plain", ("a",), ("b",))


def test_loader_splits_a_folder_of_real_notes_deterministically(tmp_path: Path) -> None:
    # Prepare: a real user with notes in two files of their own naming
    user = tmp_path / "users" / "alice"
    user.mkdir(parents=True)
    (user / "journal.md").write_text("\n\n".join(f"Journal entry {i}." for i in range(12)))
    (user / "chats.jsonl").write_text(
        "\n".join(json.dumps({"text": f"chat note {i}"}) for i in range(8))
    )

    # Execute
    first = load_user_folders(tmp_path / "users", heldout_fraction=0.25, seed=5)
    second = load_user_folders(tmp_path / "users", heldout_fraction=0.25, seed=5)

    # Assert
    assert first == second
    (alice,) = first
    assert alice.user_id == "alice"
    assert (len(alice.train), len(alice.heldout)) == (15, 5)
    assert not {e.content_key() for e in alice.train} & {e.content_key() for e in alice.heldout}


def _make(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no user folders"),
        ({"README.txt": "loose notes\n"}, "no user folders"),
        ({"bob/": ""}, r"bob: no \.txt, \.md, \.jsonl, \.json, \.csv, \.tsv or \.parquet files"),
        ({"bob/notes.txt": "# only a comment\n"}, "no notes found"),
        ({"bob/notes.txt": "one\n\ntwo\n\nthree\n"}, r"bob: got 3 notes"),
        ({"bob/train.txt": "a\n\nb\n"}, r"bob: has train\.txt but no heldout\.txt"),
        ({"bob/train.txt": "a\n", "bob/train.md": "b\n", "bob/heldout.txt": "c\n"}, "keep one"),
        ({"bob/train.txt": "a\n", "bob/heldout.txt": "\n\n"}, "heldout.txt: no notes"),
    ],
)
def test_loader_errors_name_the_folder_and_the_fix(
    files: dict[str, str], message: str, tmp_path: Path
) -> None:
    # Prepare
    root = _make(tmp_path / "users", files)
    root.mkdir(exist_ok=True)

    # Execute / Assert
    with pytest.raises(DataError, match=message):
        load_user_folders(root)


@pytest.mark.parametrize("make", [False, True])
def test_loader_rejects_a_missing_root_or_a_file(make: bool, tmp_path: Path) -> None:
    # Prepare
    root = tmp_path / "users"
    if make:
        root.write_text("not a folder")

    # Execute / Assert
    with pytest.raises(DataError, match="users: no"):
        load_user_folders(root)
