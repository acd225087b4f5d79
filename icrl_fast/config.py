"""Nested dataclass configs <-> command-line flags (``--section.field value``) and JSON.

A field's help text lives in ``field(metadata={"help": ...})``; ``--help`` lists every field with its default.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing


def _leaf_type(tp):
    """The parsing type of an annotation (``int | None`` -> int; tuples are parsed as JSON-ish lists)."""
    if isinstance(tp, str):
        tp = eval(tp, {"__builtins__": __builtins__}, {})  # noqa: S307 - annotations of our own dataclasses
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _leaf_type(args[0])[0], True
    if origin is tuple:
        return tuple, False
    return tp, False


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings of a dataclass (a string literal right after a field), e.g. ``DatasetConfig``'s."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str = "", exclude: tuple[str, ...] = ()) -> None:
    """Add a flag for every field of ``cls`` (recursing into nested dataclasses); defaults are not set here, so
    only flags the user gives appear in the parsed namespace."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(prefix.rstrip(".") or cls.__name__, (cls.__doc__ or "").split("\n")[0])
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if name in exclude:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            add_dataclass_args(parser, tp, name + ".")
            continue
        leaf, optional = _leaf_type(tp)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', docs.get(f.name, ''))} (default: {default})"
        if leaf is bool:
            group.add_argument(f"--{name}", type=_parse_bool, metavar="BOOL", default=argparse.SUPPRESS, help=help_text)
        elif leaf is tuple:
            group.add_argument(f"--{name}", type=int, nargs="+", default=argparse.SUPPRESS, help=help_text)
        else:
            conv = leaf if not optional else (lambda s, c=leaf: None if s.lower() == "none" else c(s))
            group.add_argument(f"--{name}", type=conv, default=argparse.SUPPRESS, help=help_text)


def apply_overrides(cfg, overrides: dict):
    """Return a copy of ``cfg`` with dotted-name overrides applied (``{"optim.lr": 1e-3}``)."""
    for dotted, value in overrides.items():
        head, _, rest = dotted.partition(".")
        if rest:
            cfg = dataclasses.replace(cfg, **{head: apply_overrides(getattr(cfg, head), {rest: value})})
        else:
            cfg = dataclasses.replace(cfg, **{head: tuple(value) if isinstance(value, list) else value})
    return cfg


def from_dict(cls, data: dict):
    """Rebuild a (nested) dataclass from ``dataclasses.asdict`` output."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v = data[f.name]
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            v = from_dict(tp, v)
        elif _leaf_type(tp)[0] is tuple and v is not None:
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)
