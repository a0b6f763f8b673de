"""Method options declared once: a dataclass per method that its constructor, ``from_context``
and the command line all read.

Each field is made with :func:`option`, which records the help text and the argparse type next to
the default. :func:`add_config_arguments` turns the fields into ``--flag`` options (default
``None``, so the data preset or the method's own default applies), and
:func:`config_from_options` builds the dataclass from the parsed options, keeping the defaults
for every option left at ``None``.

Example:
    >>> @dataclass
    ... class ToyConfig:
    ...     out_dim: int = option(256, "projection width")
    >>> config_from_options(ToyConfig, {"out_dim": None}).out_dim
    256
"""
import argparse
import copy
import dataclasses
from typing import Any, Callable, Dict, Optional, Type, TypeVar

from ssl_fast._argtypes import number

T = TypeVar("T")

#: argparse types shared by several methods' options (a flag two methods share must use one object)
PROBABILITY = number(float, 0, 1)
MOMENTUM = number(float, 0, 1)
POSITIVE_INT = number(int, 1)
NON_NEGATIVE = number(float, 0)


def numbers(count: int, lo: float, hi: Optional[float]):
    """argparse type of ``count`` comma-separated numbers in ``[lo, hi]``."""
    one = number(float, lo, hi)

    def parse(text) -> tuple:
        if isinstance(text, (tuple, list)):
            return tuple(float(v) for v in text)
        parts = str(text).replace(",", " ").split()
        if len(parts) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, got {text!r}")
        return tuple(one(p) for p in parts)

    parse.__name__ = f"{count} numbers"
    return parse


#: ``lo,hi`` probabilities of view 1 and view 2; colour-jitter strengths ``brightness,contrast,saturation,hue``
PROBABILITY_PAIR = numbers(2, 0, 1)
JITTER = numbers(4, 0, None)


def option(default: Any, help: str, type: Optional[Callable[[str], Any]] = None, choices=None,
           cli: bool = True) -> Any:
    """A method option: a dataclass field with its default, help text and argparse type.

    Args:
        default: the method's default (tuples allowed; they are copied per instance).
        help: what the option means, without the default (it is appended).
        type: argparse ``type`` callable (default: the default's own type).
        choices: allowed values on the command line.
        cli: whether the option gets a command-line flag (otherwise only the Python API sets it).
    """
    meta = dict(help=help, type=type, choices=choices, cli=cli)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(dest: str) -> str:
    """``out_dim`` -> ``--out-dim``."""
    return "--" + dest.replace("_", "-")


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if value is None:
        return "derived from the run"
    return str(value)


def option_fields(config_cls: Type) -> Dict[str, dataclasses.Field]:
    """The fields of a method config that are options, by name."""
    return {f.name: f for f in dataclasses.fields(config_cls)}


def add_config_arguments(parser: argparse.ArgumentParser, method: str, config_cls: Type) -> None:
    """Add one ``--flag`` per command-line option of ``config_cls`` (default ``None``).

    A flag that an earlier method already defined is not added again; the earlier help text gets
    this method's default appended, so ``--help`` shows every method's default, for example
    ``base teacher momentum (dino: 0.996; byol: 0.99)``.

    Raises:
        TypeError: two methods declare one flag with different types or choices.
    """
    group = None
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        flag = flag_name(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = meta.get("type") or (type(default) if default is not None else str)
        existing = parser._option_string_actions.get(flag)
        if existing is not None:
            if existing.type is not kind or existing.choices != meta.get("choices"):
                raise TypeError(f"{flag}: method {method!r} declares another type or choices than an earlier method")
            existing.help = existing.help[:-1] + f"; {method}: {_show(default)})"
            continue
        if group is None:
            group = parser.add_argument_group(f"{method} options")
        group.add_argument(flag, type=kind, choices=meta.get("choices"), default=None,
                           help=f"{meta['help']} ({method}: {_show(default)})")


def config_from_options(config_cls: Type[T], options: Dict[str, Any]) -> T:
    """Build ``config_cls`` from options by name; ``None`` values and other methods' options are ignored."""
    known = option_fields(config_cls)
    return config_cls(**{k: v for k, v in options.items() if k in known and v is not None})


def unknown_options(config_cls: Type, options: Dict[str, Any]):
    """Names of options that are set (not ``None``) but are not options of ``config_cls``."""
    known = option_fields(config_cls)
    return [k for k, v in options.items() if v is not None and k not in known]
