"""Inserting rows the lean way: one statement, each value converted as SQLAlchemy converts it.

A round writes its participants, its policy decisions, its audit entries and
its version in a few INSERTs. ``connection.execute(table.insert(), rows)``
spends about 9 µs a row in SQLAlchemy's own machinery before the driver sees
the row (its execution context looks every column's converter up again for
every row), against about 4 µs in the driver: most of the time of a
100-client round's two inserts. :func:`insert_rows` compiles each INSERT
once per dialect, table and set of columns, converts the values with the
very converters SQLAlchemy would use (a value the rows share, such as their
time, once), and hands the driver the rows as one ``executemany``, on SQLite
as on PostgreSQL.

Only for tables whose omitted columns have no Python-side default (the
database fills them, or they stay NULL): SQLAlchemy would compute such a
default, this does not, so a plan for one is refused.

>>> import datetime, sqlalchemy as sa
>>> table = sa.Table("notes", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
...                  sa.Column("text", sa.String), sa.Column("at", sa.DateTime))
>>> engine = sa.create_engine("sqlite://")
>>> table.metadata.create_all(engine)
>>> at = datetime.datetime(2026, 12, 6, 12, 0)
>>> with engine.begin() as connection:
...     insert_rows(connection, table, [{"text": "a", "at": at}, {"text": "b", "at": at}])
...     connection.execute(sa.select(table.c.text, table.c.at)).all()
[('a', datetime.datetime(2026, 12, 6, 12, 0)), ('b', datetime.datetime(2026, 12, 6, 12, 0))]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect

from shoal.core.errors import RegistryError

Converter = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class InsertPlan:
    """An INSERT compiled for one dialect: its text, the columns in the order its parameters
    take them, each column's converter (None: the value goes as it is), and whether the
    driver takes the parameters by name (PostgreSQL's psycopg) or by position (SQLite)."""

    sql: str
    columns: tuple[str, ...]
    converters: tuple[Converter | None, ...]
    named: bool

    def parameters(self, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Each row's converted values, as the driver takes them."""
        columns = zip(self.columns, self.converters, strict=True)
        values = [_converted(converter, [row[c] for row in rows]) for c, converter in columns]
        if self.named:
            return [dict(zip(self.columns, row, strict=True)) for row in zip(*values, strict=True)]
        return list(zip(*values, strict=True))


def insert_rows(connection: Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """INSERT ``rows`` (each with the same keys, columns of ``table``) in one statement."""
    if not rows:
        return
    plan = insert_plan(connection.dialect, table, tuple(rows[0]))
    connection.exec_driver_sql(plan.sql, plan.parameters(rows))


@functools.lru_cache(maxsize=64)
def insert_plan(dialect: Dialect, table: sa.Table, columns: tuple[str, ...]) -> InsertPlan:
    """The INSERT of ``columns`` into ``table`` for ``dialect`` (made once, kept)."""
    unknown = [name for name in columns if name not in table.c]
    if unknown:
        raise RegistryError(f"table {table.name} has no column {unknown[0]!r}")
    defaulted = [c.key for c in table.c if c.key not in columns and c.default is not None]
    if defaulted:
        raise RegistryError(
            f"column {table.name}.{defaulted[0]} has a Python-side default: insert it with "
            "SQLAlchemy, which computes it"
        )
    compiled = table.insert().compile(dialect=dialect, column_keys=list(columns))
    order = tuple(compiled.positiontup or ()) if compiled.positional else columns
    # each column's value is one parameter named as the column (no escaped names)
    if sorted(order) != sorted(columns) or sorted(compiled.binds) != sorted(columns):
        raise RegistryError(f"cannot plan the INSERT into {table.name} of {columns}")
    converters = tuple(
        table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in order
    )
    return InsertPlan(str(compiled), order, converters, named=not compiled.positional)


def _converted(converter: Converter | None, values: list[Any]) -> list[Any]:
    """``values`` through ``converter``; a value the same object as the one before it is
    converted once (a column the rows share: their run, their round, their time)."""
    if converter is None:
        return values
    out: list[Any] = []
    last: Any = _UNSET
    converted: Any = None
    for value in values:
        if value is not last:
            last, converted = value, converter(value)
        out.append(converted)
    return out


_UNSET = object()
