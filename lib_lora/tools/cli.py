"""``python -m lib_lora resize|merge|bake|extract|convert``: sub-commands made from ``tools/options.py``."""
from __future__ import annotations

import argparse
from typing import Any, Callable

from .options import TOOLS, Option, OptionError, Tool

_FMT = argparse.ArgumentDefaultsHelpFormatter


def _parse(o: Option) -> Callable[[str], Any]:
    """argparse's ``type``: the declared type, then the declaration's own check (bounds, choices)."""
    def parse(text: str) -> Any:
        try:
            return o.check(o.type(text))
        except OptionError as e:
            raise argparse.ArgumentTypeError(e.detail) from None
    parse.__name__ = o.type.__name__  # argparse names it in "invalid int value"
    return parse


def _add(sp: argparse.ArgumentParser, o: Option) -> None:
    if o.positional:
        kw: dict[str, Any] = {"nargs": "+", "metavar": "LORA"} if o.many else {}
        sp.add_argument(o.name, help=o.help, **kw)
    elif o.type is bool:
        sp.add_argument(o.flag, action="store_true", help=o.help)
    elif o.kind:  # a path
        sp.add_argument(o.flag, required=o.required, default=None, help=o.help)
    else:
        sp.add_argument(o.flag, type=_parse(o), choices=o.choices or None, required=o.required,
                        default=None if o.required else o.default, help=o.help)


def _command(t: Tool) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        t.run({o.name: getattr(args, o.name) for o in t.on("cli")}, print)
        return 0
    return run


def add_parsers(sub: argparse._SubParsersAction) -> None:
    for t in TOOLS.values():
        sp = sub.add_parser(t.name, formatter_class=_FMT, help=t.help, description=t.description)
        for o in t.on("cli"):
            _add(sp, o)
        sp.set_defaults(func=_command(t))
