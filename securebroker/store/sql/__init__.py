"""Named SQL queries, parsed once from ``.sql`` files at import.

A file holds blocks that start with ``-- name: NAME``. The result is a mapping of name to
``LiteralString`` so the type checker refuses SQL assembled from input.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import LiteralString, cast

_NAME = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, LiteralString]:
    parts = _NAME.split(text)
    out: dict[str, LiteralString] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in out:
            raise ValueError(f"query {name!r} defined twice")
        sql = body.strip()
        if not sql:
            raise ValueError(f"query {name!r} is empty")
        out[name] = cast(LiteralString, sql)
    return out


def load(filename: str) -> dict[str, LiteralString]:
    return parse(resources.files(__package__).joinpath(filename).read_text(encoding="utf-8"))


QUERIES: dict[str, LiteralString] = load("queries.sql")
