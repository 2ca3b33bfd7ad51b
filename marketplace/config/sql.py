"""Helpers for the few statements written as SQL, not through the ORM: bulk `UPDATE … FROM
(VALUES …)`, where the ORM's CASE with a WHEN per row cost more to compile than the work itself;
and statements the ORM compiles once per process and a hot path runs many times (`sql_template`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import connection
from django.db.models import Field, Model, QuerySet


def sql_table(model: type[Model]) -> str:
    """`model`'s table, quoted."""
    return connection.ops.quote_name(model._meta.db_table)


def sql_column(model: type[Model], name: str) -> str:
    """The column of `model`'s field `name`, quoted and unqualified."""
    field = model._meta.get_field(name)
    assert isinstance(field, Field)
    return connection.ops.quote_name(str(field.column))


def sql_values_row(*pg_types: str) -> str:
    """One row of placeholders for a VALUES list. PostgreSQL cannot infer a VALUES column's type
    from the table it is joined to, so each placeholder is cast (an empty type: text, left bare);
    SQLite takes them bare."""
    if connection.vendor == "postgresql":
        return "(" + ", ".join(f"%s::{kind}" if kind else "%s" for kind in pg_types) + ")"
    return "(" + ", ".join("%s" for _ in pg_types) + ")"


# A LIMIT no real statement asks for: `sql_template` finds it in the compiled SQL and makes it a parameter.
_LIMIT_MARK = 987_654_321


@dataclass(frozen=True)
class SqlTemplate:
    """A statement the ORM compiled once, to run again with other values in the marked places: for
    the few statements a dispatch round runs every time, whose compiling cost more than running them."""

    sql: str
    params: tuple[Any, ...]
    slots: tuple[tuple[int, ...], ...]  # for each mark, the parameters it fills
    limit_at: int | None  # where the LIMIT's parameter goes, if the statement has one

    def bind(self, *values: Any, limit: int | None = None) -> list[Any]:
        """The parameters for `values` (one per mark, as the database takes them: see `sql_value`)."""
        params = list(self.params)
        for places, value in zip(self.slots, values, strict=True):
            for place in places:
                params[place] = value
        if self.limit_at is not None:
            assert limit is not None, "this statement has a LIMIT"
            params.insert(self.limit_at, limit)
        return params


def sql_template(
    build: Callable[..., QuerySet[Any]], *examples: tuple[Any, Any], limited: bool = False
) -> SqlTemplate:
    """Compile `build(*marks)` once per mark and once more, and keep where the parameters differ.

    `examples` holds two different values for each of `build`'s arguments; a mark fills the
    parameters that change when its value does. `limited`: `build` returns an unsliced queryset and
    the statement takes a LIMIT as its last `bind` argument. The caller checks with a test that a
    bound template is the statement the ORM compiles for the same values."""
    firsts = [first for first, _ in examples]

    def compiled(values: list[Any]) -> tuple[str, tuple[Any, ...]]:
        queryset = build(*values)
        if limited:
            queryset = queryset[:_LIMIT_MARK]
        sql, params = queryset.query.sql_with_params()
        return sql, tuple(params)

    sql, params = compiled(firsts)
    slots: list[tuple[int, ...]] = []
    for n, (_, second) in enumerate(examples):
        other_sql, other = compiled([*firsts[:n], second, *firsts[n + 1 :]])
        if other_sql != sql or len(other) != len(params):
            raise ValueError(f"mark {n} changes the statement's shape, not only its parameters")
        slots.append(tuple(i for i, (a, b) in enumerate(zip(params, other, strict=True)) if a != b))
        if not slots[-1]:
            raise ValueError(f"mark {n} fills no parameter")
    limit_at = None
    if limited:
        literal = f"LIMIT {_LIMIT_MARK}"
        if sql.count(literal) != 1:
            raise ValueError("the statement's LIMIT was not found")
        limit_at = sql[: sql.index(literal)].count("%s")
        sql = sql.replace(literal, "LIMIT %s")
    return SqlTemplate(sql=sql, params=params, slots=tuple(slots), limit_at=limit_at)


def sql_value(model: type[Model], name: str, value: Any) -> Any:
    """`value` as the database takes it for `model`'s field `name` (a uuid is a string on SQLite)."""
    field = model._meta.get_field(name)
    assert isinstance(field, Field)
    return field.get_db_prep_value(value, connection)
