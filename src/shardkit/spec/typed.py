"""The few pydantic calls shardkit's typed models make, spelled once for pydantic 2 (today's images) and
pydantic 1.10 (the period image: DeepSpeed 0.9.2 imports pydantic 1's API and pins it below 2).

Each model declares its configuration as class keywords, which both versions read. Field help comes from
the attribute docstrings under each field, read from the source here: pydantic 1 has no
``use_attribute_docstrings``. Pydantic 1 coerces more than 2 does (a float flag given to an int field is
truncated there, refused here); the period image replays known command lines, the checks are made on 2."""

from __future__ import annotations

import ast
import inspect
import itertools
import textwrap
import typing
from functools import cache

import pydantic
from pydantic import ValidationError

PYDANTIC_1 = pydantic.VERSION.startswith("1.")

# Unknown keys refused, instances immutable, inf and nan refused as floats.
STRICT = {"extra": "forbid", "frozen": True, "allow_inf_nan": False}
OPEN = {"extra": "allow"}


def after_validator(check):
    """A model-level check run once every field is valid; it reads the fields as attributes (properties
    too) and raises ValueError with a message that names the flags itself."""
    if not PYDANTIC_1:
        return pydantic.model_validator(mode="after")(check)

    def on_values(cls, values):
        check(cls.construct(**values))
        return values

    on_values.__qualname__ = f"{check.__qualname__}.on_values"
    return pydantic.root_validator(skip_on_failure=True, allow_reuse=True)(on_values)


def dump(model: pydantic.BaseModel) -> dict:
    return model.dict() if PYDANTIC_1 else model.model_dump()


def validate(model_class: type[pydantic.BaseModel], values: dict) -> pydantic.BaseModel:
    return model_class.parse_obj(values) if PYDANTIC_1 else model_class.model_validate(values)


def field_names(model_class: type[pydantic.BaseModel]) -> list[str]:
    return list(model_class.__fields__ if PYDANTIC_1 else model_class.model_fields)


def field_annotations(model_class: type[pydantic.BaseModel]) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(model_class)
    return {name: hints[name] for name in field_names(model_class)}


@cache
def field_docstrings(model_class: type[pydantic.BaseModel]) -> dict[str, str]:
    """Each field's docstring (the string literal under its annotation), whitespace folded to one line."""
    body = ast.parse(textwrap.dedent(inspect.getsource(model_class))).body[0].body
    docs = {}
    for statement, following in itertools.pairwise(body):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return {name: docs.get(name, "") for name in field_names(model_class)}


def problems(error: ValidationError, values: dict) -> list[dict]:
    """The errors of a validation, as both versions can say them: ``loc`` (empty for a model-level check),
    ``msg``, ``missing`` and ``input`` (the offending value; pydantic 1 does not carry it, so it is looked up
    in ``values``)."""
    found = []
    for entry in error.errors():
        loc = tuple(part for part in entry["loc"] if part != "__root__")
        if "input" in entry:
            given = entry["input"]
        else:
            given = values
            for part in loc:
                given = given.get(part) if isinstance(given, dict) else None
        found.append({"loc": loc, "msg": entry["msg"].removeprefix("Value error, "),
                      "missing": entry["type"] in ("missing", "value_error.missing"), "input": given})
    return found
