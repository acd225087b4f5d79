"""Nested dataclass configs <-> command-line flags (``--section.field value``) and JSON.

A field's help text lives in ``field(metadata={"help": ...})``; ``--help`` lists every field with its default. Its
allowed values live there too: ``metadata={"range": Range(...)}`` for a number (or each number of a tuple),
``metadata={"choices": (...)}`` for a string with a fixed set of values; for a dataclass whose module stays free of
them, a table ``{cls: {field name: Range or choices}}`` passed to ``check_fields`` says the same. ``check_fields``
refuses a value outside them with a ``ValueError`` naming the flag and the value; ``undeclared`` lists the numeric
fields that declare nothing (a test keeps it empty, so a field added later without a bound fails the suite).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from collections.abc import Iterator


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line on stderr, ``error: MESSAGE``, with exit status 2 (no
    usage block: ``--help`` has it)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message}\n")


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers a field accepts: ``lo`` / ``hi`` (None: unbounded on that side), each end included unless
    ``open_lo`` / ``open_hi``; a float must also be finite, an int field takes ints only."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False

    def __contains__(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            return False
        if self.lo is not None and (v <= self.lo if self.open_lo else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.open_hi else v <= self.hi)

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.open_lo else '['}{_fmt(self.lo)}, {_fmt(self.hi)}{')' if self.open_hi else ']'}"
        if self.lo is not None:
            return f"{'>' if self.open_lo else '>='} {_fmt(self.lo)}"
        return f"{'<' if self.open_hi else '<='} {_fmt(self.hi)}"


COUNT = Range(1)  # steps, maps, episodes, sizes: at least one
NON_NEGATIVE = Range(0)  # seeds, weights (0 turns an objective off), optional amounts (0: none)
POSITIVE = Range(0, open_lo=True)  # learning rates, scales, thresholds
FRACTION = Range(0, 1)  # fractions and probabilities


def _fmt(v) -> str:
    """A value as the command line would spell it: ``-5`` for ``-5.0``, ``3 5`` for ``(3, 5)``, quoted strings."""
    if isinstance(v, (tuple, list)):
        return " ".join(_fmt(x) for x in v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return repr(v) if isinstance(v, str) else str(v)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One non-dataclass field of a nested config: its dotted ``name``, parsing type ``kind`` (int, float, bool, str
    or tuple), whether None is allowed, a tuple's length (None: any) and its declared ``Range`` or choices."""

    name: str
    kind: type
    optional: bool
    length: int | None
    allowed: Range | tuple | None

    @property
    def numeric(self) -> bool:
        return self.kind in (int, float, tuple)


def leaves(cls, table: dict | None = None, prefix: str = "") -> Iterator[Leaf]:
    """Every leaf field of the (nested) dataclass ``cls``, depth first in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaves(tp, table, prefix + f.name + ".")
            continue
        kind, optional = _leaf_type(tp)
        args = typing.get_args(tp) if kind is tuple else ()
        length = None if not args or args[-1] is Ellipsis else len(args)
        allowed = f.metadata.get("range", f.metadata.get("choices", (table or {}).get(cls, {}).get(f.name)))
        yield Leaf(prefix + f.name, kind, optional, length, allowed)


def undeclared(cls, table: dict | None = None) -> list[str]:
    """Dotted names of the numeric fields of ``cls`` (recursively) without a declared ``Range``, and of table entries
    that name no field (a renamed or removed one)."""
    missing = [leaf.name for leaf in leaves(cls, table) if leaf.numeric and not isinstance(leaf.allowed, Range)]

    def classes(c):
        yield c
        for tp in typing.get_type_hints(c).values():
            if dataclasses.is_dataclass(tp):
                yield from classes(tp)

    known = {c: {f.name for f in dataclasses.fields(c)} for c in classes(cls)}
    stale = [f"{c.__name__}.{name}" for c, entries in (table or {}).items() if c in known
             for name in entries if name not in known[c]]
    return missing + stale


def refusal(leaf: Leaf, value) -> str | None:
    """Why ``value`` is not allowed in ``leaf`` (one line naming the flag and the value), or None."""
    if value is None and leaf.optional:
        return None
    allowed = leaf.allowed
    if isinstance(allowed, Range):
        if leaf.kind is tuple:
            n = "" if leaf.length is None else f"{leaf.length} "
            ok = isinstance(value, (tuple, list)) and (leaf.length is None or len(value) == leaf.length) \
                and all(isinstance(v, int) and not isinstance(v, bool) and v in allowed for v in value) \
                and list(value) == sorted(value)
            return None if ok else f"--{leaf.name} must be {n}ascending integers {allowed} (got {_fmt(value)})"
        if leaf.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            return f"--{leaf.name} must be an integer {allowed} (got {value!r})"
        return None if value in allowed else f"--{leaf.name} must be {allowed} (got {_fmt(value)})"
    if isinstance(allowed, tuple) and value not in allowed:
        return f"--{leaf.name} must be one of {', '.join(allowed)} (got {_fmt(value)})"
    return None


def check_fields(cfg, table: dict | None = None) -> None:
    """``ValueError`` (one line: the flag, what it allows, the value) at the first field of ``cfg`` (recursively)
    outside its declared range or choices."""
    for leaf in leaves(type(cfg), table):
        value = cfg
        for part in leaf.name.split("."):
            value = getattr(value, part)
        why = refusal(leaf, value)
        if why:
            raise ValueError(why)


def check_args(args: argparse.Namespace, ranges: dict[str, Range]) -> None:
    """The same for a plain argparse namespace: ``ranges`` maps an option's dest to its ``Range`` (None passes)."""
    for dest, allowed in ranges.items():
        value = getattr(args, dest)
        if value is not None and value not in allowed:
            raise ValueError(f"--{dest.replace('_', '-')} must be {allowed} (got {_fmt(value)})")


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


def add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str = "", exclude: tuple[str, ...] = (),
                       table: dict | None = None) -> None:
    """Add a flag for every field of ``cls`` (recursing into nested dataclasses); defaults are not set here, so
    only flags the user gives appear in the parsed namespace. The help shows each field's declared range or choices
    (``table`` as in ``check_fields``), which ``check_fields`` then enforces."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(prefix.rstrip(".") or cls.__name__, (cls.__doc__ or "").split("\n")[0])
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if name in exclude:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            add_dataclass_args(parser, tp, name + ".", exclude, table)
            continue
        leaf, optional = _leaf_type(tp)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        allowed = f.metadata.get("range", f.metadata.get("choices", (table or {}).get(cls, {}).get(f.name)))
        allowed = "" if allowed is None else f"; {allowed}" if isinstance(allowed, Range) else \
            f"; one of {', '.join(allowed)}"
        help_text = f"{f.metadata.get('help', docs.get(f.name, ''))} (default: {default}{allowed})"
        if leaf is bool:
            group.add_argument(f"--{name}", type=_parse_bool, metavar="BOOL", default=argparse.SUPPRESS, help=help_text)
        elif leaf is tuple:
            args = typing.get_args(tp)
            nargs = len(args) if args and args[-1] is not Ellipsis else "+"
            group.add_argument(f"--{name}", type=int, nargs=nargs, default=argparse.SUPPRESS, help=help_text)
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
