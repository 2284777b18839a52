"""Command lines generated from frozen config dataclasses.

Each job declares ``@dataclass(frozen=True) class XConfig`` whose fields carry a docstring (a
string literal right under the field). ``parse_config(XConfig, argv)`` turns the fields into
``--kebab-case`` options with those docstrings as help, so the CLI never drifts from the config.
A field with ``metadata={"positional": True}`` becomes a positional argument.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under each field of a dataclass (inherited ones included)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field[Any], tp: Any, doc: str) -> None:
    tp = _unwrap_optional(tp)
    positional = f.metadata.get("positional", False)
    name = f.name if positional else "--" + f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    text = f"{doc} (default: {default!r})" if not positional else doc
    kwargs: dict[str, Any] = {"help": text.replace("%", "%%")}  # argparse %-formats help strings
    if not positional:
        kwargs["dest"] = f.name
        kwargs["default"] = default
    origin = get_origin(tp)
    if tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        kwargs["choices"] = list(get_args(tp))
        kwargs["type"] = type(get_args(tp)[0])
    elif origin in (list, tuple):
        kwargs["nargs"] = "*" if not positional else "+"
        kwargs["type"] = get_args(tp)[0]
    else:
        kwargs["type"] = tp
    parser.add_argument(name, **kwargs)


def build_parser(cls: type, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or (inspect.getdoc(cls) or "").split("\n\n")[0],
    )
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        _add_field(parser, f, hints[f.name], docs.get(f.name, ""))
    return parser


def parse_config(cls: type[T], argv: list[str] | None, prog: str) -> T:
    """Parse ``argv`` into a ``cls`` instance (its ``__post_init__`` validates)."""
    ns = build_parser(cls, prog).parse_args(argv)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if isinstance(values[f.name], list) and isinstance(f.default, tuple):
            values[f.name] = tuple(values[f.name])
    return cls(**values)
