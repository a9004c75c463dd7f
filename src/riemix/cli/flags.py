"""Command-line flags generated from dataclass fields and function parameters.

One source for every option: the name, type and default come from the field (or parameter) itself, the
help line from its entry in the docstring's ``Attributes:`` (or ``Args:``) section (Google style), and
the valid values of an enumerated option from the constant that the validation uses (``CHOICES``). A
flag is ``--`` + the name with ``-`` for ``_`` unless ``FLAG_NAMES`` (or a ``rename``) gives it another.

How a type hint becomes an option:

- ``bool``: ``--x/--no-x`` (``bools="switch"``), or ``--x [true|false]`` (``bools="value"``: a bare
  ``--x`` means true; the value is parsed strictly by ``parse_bool``);
- a list or sequence (or a union with one): ``nargs="+"``, one string (int, float) per item; for a union
  with a number (``num_experts: int | Sequence[int]``) one value given is the number, several the list;
- ``int``/``float``/``str`` (the first type of a union): that type; ``... | None`` also accepts
  ``none``/``null``;
- a parameter without a default: a positional argument.

Generated options default to ``argparse.SUPPRESS`` so that only the flags given appear in the namespace
(``given_values``) and every other value keeps its default where it is defined; the help line shows
that default.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from riemix.continual.config import FREEZE_POLICIES, GROW_MODES
from riemix.core.config import (
    CAPACITY_POLICIES,
    EXPERT_COMPUTE_MODES,
    INIT_MODES,
    ROUTING_MODES,
    MoELoRAConfig,
)
from riemix.core.fields import allowed_types
from riemix.hub.quantize import BASE_DTYPES, QUANTIZATIONS
from riemix.optim import OPTIMIZER_NAMES
from riemix.tasks import FORMATS, MODEL_KINDS
from riemix.training.config import REGULARIZER_MODES, SCHEDULES

__all__ = [
    "ADAPTER_OPTIONS",
    "CHOICES",
    "FLAG_NAMES",
    "Option",
    "add_adapter_options",
    "add_options",
    "dataclass_options",
    "docstring_entries",
    "function_options",
    "given_values",
    "parse_bool",
]


class _Caseless(tuple):
    """Valid values compared without case (``--optimizer RAdamW`` is accepted, as by the config)."""

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and value.lower() in tuple(self)


class _OrNone(tuple):
    """Valid values of an optional option: ``none`` / ``null`` (parsed to None) is accepted as well."""

    def __contains__(self, value: object) -> bool:
        return value is None or tuple.__contains__(self, value)


#: Option name -> its valid values (the constants the configs validate against).
CHOICES: dict[str, tuple[str, ...]] = {
    "routing": ROUTING_MODES,
    "init": INIT_MODES,
    "expert_compute": EXPERT_COMPUTE_MODES,
    "capacity_policy": CAPACITY_POLICIES,
    "optimizer": _Caseless(OPTIMIZER_NAMES),
    "model_kind": MODEL_KINDS,
    "format": FORMATS,
    "schedule": SCHEDULES,
    "regularizer_mode": REGULARIZER_MODES,
    "quantization": _OrNone(QUANTIZATIONS),
    "base_dtype": _OrNone(BASE_DTYPES),
    "grow": GROW_MODES,
    "freeze": FREEZE_POLICIES,
}

#: Option name -> flag name, where they differ (kept from the first command line: ``--experts``).
FLAG_NAMES = {"num_experts": "experts"}


@dataclass(frozen=True)
class Option:
    """One field or parameter as a command-line option.

    Attributes:
        name: The field or parameter name (the key of the value it sets).
        hint: Its resolved type hint.
        default: Its default (``inspect.Parameter.empty`` for a required parameter).
        doc: Its docstring entry, whitespace collapsed (the help line).
    """

    name: str
    hint: Any
    default: Any
    doc: str

    @property
    def required(self) -> bool:
        """True for a parameter without a default (a positional argument)."""
        return self.default is inspect.Parameter.empty


def docstring_entries(doc: str | None, section: str) -> dict[str, str]:
    """The entries of one section of a Google-style docstring.

    Args:
        doc: The docstring (any indentation).
        section: The section title, e.g. ``"Attributes"`` or ``"Args"``.

    Returns:
        ``{name: text}`` in docstring order; an entry's continuation lines are joined with single spaces.
    """
    lines = [ln.rstrip() for ln in inspect.cleandoc(doc or "").splitlines()]  # titles at column 0
    entries: dict[str, str] = {}
    if f"{section}:" not in lines:
        return entries
    indent = current = None
    for line in lines[lines.index(f"{section}:") + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:  # the next section
            break
        indent = indent or depth
        if depth == indent:
            name, _, text = line.strip().partition(":")
            current = name.split(" (")[0]  # ``name (type): text`` is Google style too
            entries[current] = text.strip()
        elif current is not None:
            entries[current] = f"{entries[current]} {line.strip()}".strip()
    return entries


def dataclass_options(cls: type, skip: Iterable[str] = ()) -> list[Option]:
    """The fields of dataclass ``cls`` as options, documented by its ``Attributes:`` section."""
    hints = typing.get_type_hints(cls)
    docs = docstring_entries(cls.__doc__, "Attributes")
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(Option(f.name, hints[f.name], default, docs.get(f.name, "")))
    return out


def function_options(fn: Callable, skip: Iterable[str] = ()) -> list[Option]:
    """The parameters of ``fn`` as options, documented by its ``Args:`` section."""
    hints = typing.get_type_hints(fn)
    docs = docstring_entries(fn.__doc__, "Args")
    return [
        Option(name, hints.get(name, str), p.default, docs.get(name, ""))
        for name, p in inspect.signature(fn).parameters.items()
        if name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def parse_bool(text: str) -> bool:
    """``true/yes/1`` -> True, ``false/no/0`` -> False (any case); anything else is an error."""
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _nullable(cast: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else cast(text)

    parse.__name__ = cast.__name__  # argparse names the type in its error messages
    return parse


def _resume(text: str) -> bool | str:
    return True if text.lower() in ("", "latest", "true") else text


def _show(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "none"
    return str(value)


def _argument(opt: Option, bools: str, choices: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """``add_argument`` keywords (other than help/default) for ``opt``."""
    hint = opt.hint
    args = allowed_types(hint)  # (hint,) unless a union
    if opt.name == "resume" and hint is not bool:  # True (latest checkpoint) or a checkpoint path
        return {"nargs": "?", "const": True, "type": _resume, "metavar": "CHECKPOINT"}
    if hint is bool:
        if bools == "switch":
            return {"action": argparse.BooleanOptionalAction}
        return {"nargs": "?", "const": True, "type": parse_bool, "metavar": "{true,false}"}
    seq = next((a for a in args if typing.get_origin(a) in (list, collections.abc.Sequence)), None)
    if seq is not None:
        item = (typing.get_args(seq) or (str,))[0]
        return {"nargs": "+", "type": item} if item in (int, float) else {"nargs": "+"}
    base = next((a for a in args if a is not type(None)), str)
    cast = base if base in (int, float, str) else str
    kw: dict[str, Any] = {"type": _nullable(cast) if type(None) in args else cast}
    if opt.name in choices:
        kw["choices"] = choices[opt.name]
    return kw


def _help(opt: Option) -> str:
    text = (opt.doc or opt.name.replace("_", " ")).replace("``", "")
    if not opt.required and not (opt.default is None and "default" in text):  # None's meaning is told
        text = f"{text} (default: {_show(opt.default)})"
    return text.replace("%", "%%")


def add_options(
    parser: argparse.ArgumentParser,
    options: Iterable[Option],
    bools: str = "switch",
    rename: dict[str, str] | None = None,
    choices: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """Add one argument per option to ``parser`` (or an argument group).

    Args:
        parser: The parser or an argument group of it (``parser.add_argument_group``).
        options: From ``dataclass_options`` / ``function_options``.
        bools: ``"switch"`` (``--x/--no-x``) or ``"value"`` (``--x [true|false]``) for bool options.
        rename: Option name -> flag name, over ``FLAG_NAMES``.
        choices: Option name -> valid values, over ``CHOICES``.
    """
    names = {**FLAG_NAMES, **(rename or {})}
    valid = {**CHOICES, **(choices or {})}
    for opt in options:
        kw = _argument(opt, bools, valid)
        flag = names.get(opt.name, opt.name).replace("_", "-")
        if opt.required:
            parser.add_argument(opt.name, metavar=flag.upper().replace("-", "_"), help=_help(opt), **kw)
        else:
            parser.add_argument("--" + flag, dest=opt.name, default=argparse.SUPPRESS, help=_help(opt), **kw)


def _collapse(opt: Option, value: Any) -> Any:
    """One number given to an option that takes a number or a list of them (``--experts 4``) is the number;
    several (``--experts 2 4 8``) are the list."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (int, float)):
        if type(value[0]) in allowed_types(opt.hint):
            return value[0]
    return value


def given_values(ns: argparse.Namespace, options: Iterable[Option]) -> dict[str, Any]:
    """``{name: value}`` of the options present in ``ns`` (given on the command line)."""
    return {opt.name: _collapse(opt, getattr(ns, opt.name)) for opt in options if hasattr(ns, opt.name)}


#: The adapter options: every ``MoELoRAConfig`` field (``train`` and ``check-init``).
ADAPTER_OPTIONS = dataclass_options(MoELoRAConfig)


def add_adapter_options(parser: argparse.ArgumentParser) -> None:
    """Add the adapter group: one flag per ``MoELoRAConfig`` field, bools as ``--x [true|false]``."""
    add_options(parser.add_argument_group("adapter (MoELoRAConfig)"), ADAPTER_OPTIONS, bools="value")
