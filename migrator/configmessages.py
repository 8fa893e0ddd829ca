"""How a configuration that does not validate is told to the user: each problem names its key (`[copy] workers`),
what was given (never the value of a DSN, a command or a password) and what is allowed, with a "did you mean" for a
misspelled section, key or choice. The schema itself is migrator/config.py's; these functions read it through
pydantic's field information and are given its root type."""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types


def fields_of(cls: Any) -> dict[str, Any]:
    """A schema class's fields (pydantic's FieldInfo: annotation and constraints) by name; {} for other types."""
    return dict(getattr(cls, "__pydantic_fields__", {}))



def _where(loc: tuple[Any, ...]) -> str:
    names = [str(p) for p in loc if isinstance(p, str)]
    if not names:
        return "the file"
    key = " ".join(names[1:])
    return f"[{names[0]}] {key}".rstrip() + "".join(f" item {p + 1}" for p in loc if isinstance(p, int))


def _is_secret(loc: tuple[Any, ...]) -> bool:
    """Values never repeated in a message: DSNs (which may hold a password), commands, connect strings."""
    return any(isinstance(p, str) and (p in ("source", "target", "pooler_target") or p.endswith(("dsn", "command"))
                                       or "password" in p) for p in loc)


def _given(value: Any, secret: bool) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)
    if secret or isinstance(value, dict | list):
        return kind + (" (value not shown)" if secret else "")
    shown = ("true" if value else "false") if isinstance(value, bool) else (
        f'"{value}"' if isinstance(value, str) else str(value))
    return f"{kind}, {shown[:60]}{'...' if len(shown) > 60 else ''}"


def _field(root: Any, loc: tuple[Any, ...]) -> tuple[Any, list[Any]]:
    """The declared type of the value at `loc` and its constraints; (None, []) for a key the schema lacks."""
    tp: Any = root
    metadata: list[Any] = []
    for part in loc:
        tp, _ = _unwrap(tp)
        if isinstance(part, str) and part in fields_of(tp):
            info = fields_of(tp)[part]
            tp, metadata = info.annotation, list(info.metadata)
        elif isinstance(part, int) and typing.get_origin(tp) is tuple:
            tp, metadata = typing.get_args(tp)[0], []
        else:
            return None, []
    return tp, metadata


def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    metadata: list[Any] = []
    while typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        metadata += extra
    return tp, metadata


def _allowed(tp: Any, metadata: list[Any]) -> str:
    tp, extra = _unwrap(tp)
    metadata = metadata + extra
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return _allowed(options[0], metadata) + " (or leave the key out)"
    if origin is Literal:
        return "one of " + ", ".join(f'"{a}"' for a in typing.get_args(tp))
    if origin is tuple:
        item = _allowed(typing.get_args(tp)[0], [])
        return "a list of " + re.sub(r"^an? (.*string)$", r"\1s", item) + ', e.g. ["a", "b"]'
    if fields_of(tp):
        return "a table with the keys " + ", ".join(fields_of(tp))
    text = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))
    for m in metadata:
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            bound = getattr(m, attr, None)
            if bound is not None and not isinstance(m, annotated_types.MinLen):
                text += f" {op} {bound:g}" if isinstance(bound, float) else f" {op} {bound}"
        if isinstance(m, annotated_types.MinLen) and m.min_length == 1 and tp is str:
            text = "a non-empty string"
    return text


def suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"did you mean {close[0]}? " if close else ""


def describe_error(root: Any, err: Any) -> str:
    """One pydantic error of a file validated against the schema `root`, told as the key it names and what is
    allowed there; the values of DSNs, commands and passwords are never repeated."""
    loc: tuple[Any, ...] = tuple(err["loc"])
    kind: str = err["type"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        tp, _ = _unwrap(_field(root, loc[:-1])[0])
        known = list(fields_of(tp))
        if len(loc) == 1:
            hint = suggest(str(loc[0]), known)
            return (f"[{loc[0]}]: unknown section; {hint.replace('mean ', 'mean [').replace('?', ']?')}"
                    f"the sections are {', '.join(f'[{k}]' for k in known)}")
        return f"{_where(loc)}: unknown key; {suggest(str(loc[-1]), known)}the keys of [{loc[0]}] are {', '.join(known)}"
    tp, metadata = _field(root, loc)
    secret = _is_secret(loc)
    if kind == "value_error":
        message = str(err.get("msg", "")).removeprefix("Value error, ")
        if secret:
            message = re.sub(r'"[^"]*"', "(value not shown)", message)
        return f"{_where(loc)}: {message}"
    given = _given(err.get("input"), secret)
    allowed = _allowed(tp, metadata) if tp is not None else str(err.get("msg", ""))
    suggestion = ""
    if kind == "literal_error" and isinstance(err.get("input"), str):
        suggestion = suggest(err["input"], [str(a) for a in typing.get_args(_unwrap(tp)[0])])
    elif kind in ("tuple_type", "list_type") and isinstance(err.get("input"), str) and not secret:
        suggestion = f'write it as a list: ["{err["input"]}"]; '
    return f"{_where(loc)}: given {given}; {suggestion}allowed: {allowed}"


def production_problems(same: dict[str, str | None]) -> list[str]:
    """[rehearsal] production_dsn naming the database of [source] or [target] (`same`: section -> the database both
    name, or None): a rehearsal writes to both, so production must be neither."""
    return [f"[rehearsal] production_dsn names the same database as [{section}] dsn ({where}); a rehearsal writes "
            "to [source] and [target], so production must be another database (the one the test copies were "
            "restored from)" for section, where in same.items() if where]


def problems_text(problems: list[str], path: Path | None) -> str:
    where = str(path) if path is not None else "the configuration"
    if len(problems) == 1:
        return f"{where}: {problems[0]}"
    return f"{where} has {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)
