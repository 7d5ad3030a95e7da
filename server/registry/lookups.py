"""The registry's hot point lookups, compiled once and run on the driver's cursor.

A lookup such as "the newest version of this user" costs SQLite about 30 µs; through
SQLAlchemy's execution layer it cost about 600 µs of Python: building and cache-keying
the ``Select`` (a third of it), an explicit ``BEGIN`` through the engine's ``begin``
hook, the result machinery, and the pool's connection wrapper. On a busy machine that
CPU time is also what the tail is made of: measured in ``bench/registry_scale.py``'s
diagnosis, a call is preempted in proportion to the CPU it takes (a 0.55 ms busy loop
showed the same 8 ms p99 as the lookup, and nearly every slow call had an involuntary
context switch), while GC pauses (``gc.disable()``: no change) and the query plan (one
index search per table, no sort) were not it.

So a :class:`Prepared` statement is built and compiled once per dialect, keeping the
SQL string, the order of its parameters and the result columns' type processors; a
lookup then borrows a pooled DBAPI connection and runs one ``execute`` on it. A single
``SELECT`` needs no explicit transaction: SQLite (whose driver connection is in
autocommit mode, see ``database``) reads one consistent snapshot per statement, and on
PostgreSQL the driver opens the transaction that the pool rolls back on return.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Dialect, Engine, Select


@dataclass(frozen=True)
class Prepared:
    """One compiled lookup: SQL text, parameter layout, and how to read its rows."""

    sql: str
    positions: tuple[str, ...] | None
    """Parameter names in order for positional drivers (SQLite); None: by name."""
    defaults: Mapping[str, Any]
    """Values the statement binds itself (its ``LIMIT``)."""
    row: Any
    """A named tuple of the result columns, so records read ``row.version`` as from Core."""
    processors: tuple[Callable[[Any], Any] | None, ...]


def prepare(statement: Select[Any], dialect: Dialect) -> Prepared:
    """Compile ``statement`` once for ``dialect`` (bind parameters stay parameters)."""
    compiled = statement.compile(dialect=dialect)
    columns = list(statement.selected_columns)
    processors = tuple(
        column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
    )
    positions = tuple(compiled.positiontup) if compiled.positiontup is not None else None
    return Prepared(
        sql=compiled.string,
        positions=positions,
        defaults={k: v for k, v in compiled.params.items() if v is not None},
        row=namedtuple("Row", [c.key for c in columns]),  # type: ignore[misc]
        processors=processors,
    )


def fetch(engine: Engine, prepared: Prepared, params: Mapping[str, Any]) -> list[Any]:
    """Run a prepared lookup on a pooled driver connection; rows as named tuples.

    Driver errors propagate as the driver raised them (the caller maps them).
    """
    values = {**prepared.defaults, **params}
    args: Any = (
        tuple(values[name] for name in prepared.positions)
        if prepared.positions is not None
        else values
    )
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        try:
            cursor.execute(prepared.sql, args)
            raw = cursor.fetchall()
        finally:
            cursor.close()
    finally:
        connection.close()
    make, processors = prepared.row._make, prepared.processors
    return [
        make(
            value if proc is None else proc(value)
            for proc, value in zip(processors, r, strict=True)
        )
        for r in raw
    ]
