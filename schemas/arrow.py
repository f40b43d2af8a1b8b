"""Derive Arrow schemas from the pydantic records, so each column is declared once."""

from __future__ import annotations

import types
import typing
from datetime import datetime
from functools import cache
from typing import Any, Union

import pyarrow as pa
from pydantic import BaseModel

_SCALARS: dict[Any, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
    datetime: pa.timestamp("us", tz="UTC"),
}


def _arrow_type(annotation: Any) -> tuple[pa.DataType, bool]:
    """(Arrow type, nullable) for a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        assert len(args) == 1, f"only Optional[X] unions map to Arrow, got {annotation}"
        return _arrow_type(args[0])[0], True
    if origin is list:
        (item,) = typing.get_args(annotation)
        return pa.list_(_arrow_type(item)[0]), False
    if origin is typing.Literal:
        return pa.string(), False
    if annotation in _SCALARS:
        return _SCALARS[annotation], False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct(list(arrow_schema(annotation))), False
    raise TypeError(f"no Arrow mapping for field type {annotation!r}")


@cache
def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    """The Arrow schema of a record model, in field order (nested models become structs)."""
    hints = typing.get_type_hints(model)
    fields = []
    for name in model.model_fields:
        dtype, nullable = _arrow_type(hints[name])
        fields.append(pa.field(name, dtype, nullable=nullable))
    return pa.schema(fields)


def to_table(records: typing.Sequence[BaseModel], model: type[BaseModel]) -> pa.Table:
    """Records -> an Arrow table with exactly the model's schema (an empty table if none)."""
    schema = arrow_schema(model)
    rows = [r.model_dump() for r in records]
    return pa.Table.from_pylist(rows, schema=schema)
