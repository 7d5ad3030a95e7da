"""A real-text personalization benchmark: human-written short texts, one topic per user.

The texts are the classic BSD ``fortune`` cookie files as Debian ships them (packages
``fortunes`` and ``fortunes-min``, in Debian main, so under a DFSG-free licence: the
BSD licence of the original collection, see ``/usr/share/doc/fortunes/copyright``).
Each file gathers quips, quotations and short anecdotes on one topic (``food``,
``law``, ``medicine``, ``sports`` ...), written by people over decades. A topic becomes
one simulated user, so users differ in vocabulary and subject, while all of them share
the genre's habits (attribution lines such as ``-- Mark Twain``, aphorisms, dialogue):
the structure a shared prior can learn and the content only a personal adapter can.

Nothing here is committed to the repository: :func:`fetch_fortunes` finds the installed
files or downloads the two ``.deb`` files with ``apt-get download`` (no root needed once
the package lists exist) and unpacks them with ``dpkg-deb``, and :func:`build_benchmark`
writes one JSON Lines file of notes per user. The split into train / validation / test
is the experiment's (:func:`lorafleet.sim.experiment.three_way_split`), by a hash of each
note's content, so it is the same on every machine.

Examples
--------
>>> from lorafleet.sim.realtext import DEFAULT_TOPICS
>>> len(DEFAULT_TOPICS) >= 16
True
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lorafleet.protocols.atomic import atomic_write_text
from lorafleet.protocols.errors import DataError

__all__ = [
    "DEFAULT_SIZES",
    "DEFAULT_TOPICS",
    "build_benchmark",
    "fetch_fortunes",
    "read_fortune_file",
]

log = logging.getLogger(__name__)

INSTALLED_DIR = Path("/usr/share/games/fortunes")
"""Where Debian's ``fortunes`` package installs its files."""

DEBIAN_PACKAGES = ("fortunes", "fortunes-min")

DEFAULT_TOPICS: tuple[str, ...] = (
    "food",
    "law",
    "medicine",
    "sports",
    "startrek",
    "pets",
    "love",
    "kids",
    "education",
    "art",
    "science",
    "politics",
    "literature",
    "drugs",
    "computers",
    "work",
    "men-women",
    "wisdom",
    "people",
    "humorists",
    "platitudes",
    "songs-poems",
    "definitions",
    "zippy",
    "riddles",
    "linux",
    "perl",
    "knghtbrd",
    "cookie",
    "miscellaneous",
)
"""Topics in the order users are taken: the first 8 are the default benchmark, the next 2
its newcomers; 10-15 are the held-out users of docs/personalization.md and 16-17 their
first two newcomers; 18-23 six more held-out newcomers, so that the held-out cold start
rests on eight users instead of two (chosen by size alone: at least 160 notes each
between :data:`MIN_CHARS` and :data:`MAX_CHARS`, before any result on them); 24-29
newcomers on which the cold-start recipe may be tuned, beside the default benchmark's
prior, so that the held-out newcomers stay a test of it."""

DEFAULT_SIZES: tuple[int, ...] = (20, 190, 45, 120, 30, 80, 160, 60)
"""Notes per user, cycled over the topics: small and large users side by side (20-190)."""

MAX_CHARS = 400
"""Longer fortunes (long poems, whole stories) are dropped: the benchmark is short notes."""

MIN_CHARS = 20


def read_fortune_file(path: Path) -> list[str]:
    """The entries of one fortune file (``%`` on its own line separates them).

    Tabs and trailing spaces are normalised; entries shorter than :data:`MIN_CHARS` or
    longer than :data:`MAX_CHARS` characters are dropped, and duplicates kept once.
    """
    try:
        raw = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    entries: list[str] = []
    seen: set[str] = set()
    for chunk in raw.replace("\r\n", "\n").split("\n%\n"):
        lines = [line.replace("\t", "    ").rstrip() for line in chunk.strip("\n%").split("\n")]
        text = "\n".join(lines).strip()
        if MIN_CHARS <= len(text) <= MAX_CHARS and text not in seen:
            seen.add(text)
            entries.append(text)
    return entries


def fetch_fortunes(cache_dir: Path) -> Path:
    """A folder holding the fortune files: the installed ones, else downloaded and unpacked.

    Raises
    ------
    DataError
        Neither installed nor downloadable; the message says how to install them.
    """
    if (INSTALLED_DIR / "food").is_file():
        return INSTALLED_DIR
    unpacked = Path(cache_dir) / "fortunes" / "usr" / "share" / "games" / "fortunes"
    if (unpacked / "food").is_file():
        return unpacked
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DataError(
            "the fortune files are not installed and apt-get/dpkg-deb are missing; "
            "install Debian's 'fortunes' package or copy its files to " + str(INSTALLED_DIR)
        )
    root = Path(cache_dir) / "fortunes"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        log.info("downloading %s with apt-get", ", ".join(DEBIAN_PACKAGES))
        done = subprocess.run(
            ["apt-get", "download", *DEBIAN_PACKAGES],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
        )
        debs = sorted(Path(tmp).glob("*.deb"))
        if done.returncode != 0 or len(debs) < len(DEBIAN_PACKAGES):
            reason = (done.stderr.strip().splitlines() or ["no .deb downloaded"])[-1]
            raise DataError(
                f"apt-get download {' '.join(DEBIAN_PACKAGES)} failed ({reason}); run "
                "'apt-get update' first, or install the 'fortunes' package"
            )
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    if not (unpacked / "food").is_file():
        raise DataError(f"the unpacked packages hold no fortune files under {unpacked}")
    return unpacked


def build_benchmark(
    out: Path,
    *,
    num_users: int = 8,
    topics: Sequence[str] = DEFAULT_TOPICS,
    sizes: Sequence[int] = DEFAULT_SIZES,
    seed: int = 0,
    source: Path | None = None,
    cache_dir: Path | None = None,
    num_newcomers: int = 0,
    newcomer_size: int = 160,
) -> Path:
    """Write ``out/users/<topic>/notes.jsonl`` for the first ``num_users`` topics.

    User *i* gets ``sizes[i % len(sizes)]`` notes (or all its topic has, if fewer),
    drawn without replacement by a PCG64 generator keyed by ``(seed, i)``; a ``SOURCE``
    file beside them names the package and licence. The next ``num_newcomers`` topics
    go to ``out/newcomers/`` with ``newcomer_size`` notes each: users who never take
    part, for the cold-start curve.

    Returns
    -------
    Path
        ``out/users``, ready for ``lorafleet-sim experiment --users-dir`` (and
        ``out/newcomers`` for ``--newcomers-dir``).
    """
    if not 1 <= num_users <= len(topics) - num_newcomers:
        raise DataError(
            f"num_users must be in 1..{len(topics) - num_newcomers} with {num_newcomers} "
            f"newcomers, got {num_users}"
        )
    folder = source or fetch_fortunes(Path(cache_dir or out.parent / ".cache"))
    out = Path(out)
    chosen = [(t, "users", sizes[i % len(sizes)]) for i, t in enumerate(topics[:num_users])]
    chosen += [
        (t, "newcomers", newcomer_size) for t in topics[num_users : num_users + num_newcomers]
    ]
    for i, (topic, group, size) in enumerate(chosen):
        entries = read_fortune_file(folder / topic)
        want = min(size, len(entries))
        rng = np.random.Generator(np.random.PCG64([seed, i]))
        picked = sorted(rng.choice(len(entries), size=want, replace=False).tolist())
        lines = [json.dumps({"text": entries[j]}, ensure_ascii=False) for j in picked]
        atomic_write_text(out / group / topic / "notes.jsonl", "\n".join(lines) + "\n")
    atomic_write_text(
        out / "SOURCE",
        "BSD fortune files from Debian's 'fortunes' and 'fortunes-min' packages (main, "
        "BSD licence: /usr/share/doc/fortunes/copyright). One topic file per user.\n",
    )
    return out / "users"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lorafleet.sim.realtext OUT [--users N] [--seed S]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lorafleet.sim.realtext",
        description="Fetch the fortune files and write one user folder per topic.",
    )
    parser.add_argument("out", type=Path, help="folder to write the user folders into")
    parser.add_argument(
        "--topics",
        default=",".join(DEFAULT_TOPICS),
        help="comma-separated topics, taken in order: users first, then newcomers (e.g. "
        "the held-out set: science,politics,literature,drugs,computers,work)",
    )
    parser.add_argument("--users", type=int, default=8, help="users (topics) to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the note sampling")
    parser.add_argument("--newcomers", type=int, default=2, help="users who never take part")
    args = parser.parse_args(argv)
    topics = tuple(t.strip() for t in args.topics.split(",") if t.strip())
    unknown = [t for t in topics if t not in DEFAULT_TOPICS]
    if unknown:
        print(
            f"error: unknown topic {unknown[0]!r}; choose from {', '.join(DEFAULT_TOPICS)}",
            file=sys.stderr,
        )
        return 2
    try:
        out = build_benchmark(
            args.out,
            num_users=args.users,
            topics=topics,
            seed=args.seed,
            num_newcomers=args.newcomers,
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.users} users to {out} and {args.newcomers} newcomers beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
