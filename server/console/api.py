"""What the console's JSON API and its pages share: cursors, page links, JSON documents.

Every page of the console has a read-only twin under ``/api/v1`` that returns the data
the page renders, so an operator's script never scrapes HTML. The helpers here keep
the two from drifting: query parameters are parsed once into typed cursors (a bad one
is one 400 message, never a 500), "previous" and "next" links are built from the
request itself (so a page links to pages and the API to the API), and registry records
become JSON by one rule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import URL

API_PREFIX = "/api/v1"
MAX_CURSOR = 2**63 - 1
"""Registry ids are signed 64-bit integers on PostgreSQL; nothing larger is a row."""
_PROPERTIES = ("version", "duration_s", "revoked")
"""Computed fields the pages show, serialized next to the records' own fields."""


class BadQuery(ValueError):
    """A query parameter the console cannot use; its message is the whole answer."""


def int_cursor(name: str, value: str | None) -> int | None:
    """``after=``/``before=`` of an id-ordered listing: a whole number, or None when absent."""
    if value is None or value == "":
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or int(text) > MAX_CURSOR:
        shown = value if len(value) <= 40 else value[:40] + "…"
        raise BadQuery(
            f"{name} must be a whole number from 0 to {MAX_CURSOR} (a page link's value), "
            f"got {shown!r}"
        )
    return int(text)


def text_cursor(name: str, value: str | None) -> str | None:
    """``after=``/``before=`` of the users list: a pseudonym, or None when absent."""
    from lorafleet.server.registry import RegistryValueError
    from lorafleet.server.registry.records import check_pseudonym

    if value is None or value == "":
        return None
    try:
        return check_pseudonym(value)
    except RegistryValueError:
        shown = value if len(value) <= 40 else value[:40] + "…"
        raise BadQuery(f"{name} must be a pseudonym (a page link's value), got {shown!r}") from None


def int_cursors(
    after: str | None, before: str | None, *, prefix: str = ""
) -> tuple[int | None, int | None]:
    """Both cursors of an id-ordered listing; giving both is a mistake, said once."""
    both = int_cursor(f"{prefix}after", after), int_cursor(f"{prefix}before", before)
    if both[0] is not None and both[1] is not None:
        raise BadQuery(f"give {prefix}after= or {prefix}before=, not both (a page link has one)")
    return both


def text_cursors(after: str | None, before: str | None) -> tuple[str | None, str | None]:
    """Both cursors of the users list; giving both is a mistake, said once."""
    both = text_cursor("after", after), text_cursor("before", before)
    if both[0] is not None and both[1] is not None:
        raise BadQuery("give after= or before=, not both (a page link has one)")
    return both


def page_links(
    url: URL,
    next_after: int | str | None,
    prev_before: int | str | None,
    *,
    after: str = "after",
    before: str = "before",
) -> dict[str, str | None]:
    """Links to the next and previous page: this request's URL with one cursor swapped.

    Every other query parameter (the search, the cohort, another listing's cursor on the
    same page) is kept, so paging one table of a page leaves the rest as it was.
    """
    kept = [
        (k, v) for k, v in parse_qsl(url.query, keep_blank_values=True) if k not in (after, before)
    ]

    def link(key: str, cursor: int | str | None) -> str | None:
        if cursor is None:
            return None
        return f"{url.path}?{urlencode([*kept, (key, str(cursor))])}"

    return {"next": link(after, next_after), "prev": link(before, prev_before)}


def to_json(value: Any) -> Any:
    """Registry records, page contexts and results as JSON values.

    Dataclasses become objects (with the computed fields the pages show), datetimes ISO
    8601 strings, bytes hex, tuples lists, mapping keys strings; a float that is not
    finite becomes null, since JSON has no NaN.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
        for name in _PROPERTIES:
            if isinstance(getattr(type(value), name, None), property):
                out[name] = to_json(getattr(value, name))
        return out
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)
