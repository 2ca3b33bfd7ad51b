"""Helpers for the few statements written as SQL, not through the ORM: bulk `UPDATE … FROM
(VALUES …)`, where the ORM's CASE with a WHEN per row cost more to compile than the work itself."""

from __future__ import annotations

from django.db import connection
from django.db.models import Field, Model


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
