"""Command lines generated from frozen config dataclasses.

Each job declares ``@dataclass(frozen=True) class XConfig`` whose fields carry a docstring (a
string literal right under the field). ``parse_config(XConfig, argv)`` turns the fields into
``--kebab-case`` options with those docstrings as help, so the CLI never drifts from the config.
A field with ``metadata={"positional": True}`` becomes a positional argument, one with
``metadata={"remainder": True}`` takes every argument after the positionals (``submit``'s job
arguments). A field whose type is itself a config dataclass (e.g. ``SamplingParams``, declared once
in ``ops/``) is flattened: its fields become options of the command under their own names, and
``parse_config`` builds the nested instance from them; a nested field's own default (e.g.
``field(default_factory=lambda: SwapSweep(swap_greedy=True))``) supplies its options' defaults,
so a job can nest a shared config with defaults of its own. Two options of one command may not
share a name.
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


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field[Any], tp: Any, doc: str, default: Any) -> None:
    tp = _unwrap_optional(tp)
    if f.metadata.get("remainder", False):
        parser.add_argument(f.name, nargs=argparse.REMAINDER, help=doc.replace("%", "%%"))
        return
    positional = f.metadata.get("positional", False)
    name = f.name if positional else "--" + f.name.replace("_", "-")
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


def _nested(tp: Any) -> type | None:
    """The config dataclass a field nests, or None for a plain option."""
    tp = _unwrap_optional(tp)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _leaves(
    cls: type, seen: dict[str, str] | None = None, owner: str = "", instance: Any = None
) -> list[tuple[dataclasses.Field[Any], Any, Any]]:
    """Every plain option of ``cls``, nested configs flattened, with its type and default (read
    from ``instance``, the nesting field's default, when there is one); raises on a name clash."""
    seen = {} if seen is None else seen
    hints = typing.get_type_hints(cls)
    out: list[tuple[dataclasses.Field[Any], Any, Any]] = []
    for f in dataclasses.fields(cls):
        default = getattr(instance, f.name) if instance is not None else _field_default(f)
        sub = _nested(hints[f.name])
        if sub is not None:
            out += _leaves(sub, seen, f"{owner}{f.name}.", default)
            continue
        if f.name in seen:
            raise TypeError(f"{cls.__name__}: option '{f.name}' declared twice ({seen[f.name]} and {owner}{f.name})")
        seen[f.name] = f"{owner}{f.name}"
        out.append((f, hints[f.name], default))
    return out


def _docs_of(cls: type) -> dict[str, str]:
    """Field docstrings of ``cls`` and of every config it nests."""
    hints = typing.get_type_hints(cls)
    docs: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        sub = _nested(hints[f.name])
        if sub is not None:
            docs.update(_docs_of(sub))
    docs.update(field_docs(cls))
    return docs


def build_parser(
    cls: type, prog: str, description: str | None = None, epilog: str | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or (inspect.getdoc(cls) or "").split("\n\n")[0],
        epilog=epilog,
    )
    docs = _docs_of(cls)
    for f, tp, default in _leaves(cls):
        _add_field(parser, f, tp, docs.get(f.name, ""), default)
    return parser


def _build(cls: type[T], values: dict[str, Any]) -> T:
    """An instance of ``cls`` from the parsed flat ``values`` (nested configs built first)."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        sub = _nested(hints[f.name])
        if sub is not None:
            kwargs[f.name] = _build(sub, values)
            continue
        value = values[f.name]
        if isinstance(value, list) and (isinstance(f.default, tuple) or get_origin(hints[f.name]) is tuple):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def parse_config(cls: type[T], argv: list[str] | None, prog: str, epilog: str | None = None) -> T:
    """Parse ``argv`` into a ``cls`` instance (its ``__post_init__`` validates)."""
    ns = build_parser(cls, prog, epilog=epilog).parse_args(argv)
    return _build(cls, vars(ns))
