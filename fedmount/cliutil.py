"""What every fedmount command line shares: argument types and the help of subcommands.

Standalone (it imports nothing of fedmount), so that any command, at any layer, may use it
without standing above another command: ``fedmount``, ``fedmount locate``/``stage``/
``unpin`` and ``fedmount-run`` all take sizes and seconds the same way.

`Subcommand` is what a subcommand tells ``fedmount --help`` about itself: its synopsis and
description (the same words open its own ``--help`` and are in man/fedmount.1).
"""

from __future__ import annotations

import argparse
import re
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``64M``, ``64MiB``, ``1.5G`` (binary multiples)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 1048576, 512M, 2GiB)")
    number, unit = float(m.group(1)), m.group(2).lower()
    return int(number * 1024 ** "_kmgtp".index(unit)) if unit else int(number)


def seconds(text: str) -> float:
    """argparse type of a SECONDS option (fedmount's and fedmount-run's): a number, not negative."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


@dataclass(frozen=True)
class Subcommand:
    """``fedmount NAME SYNOPSIS``: what ``fedmount --help`` lists and the subcommand's own
    ``--help`` opens with."""

    name: str
    synopsis: str
    description: str


def subcommands_text(commands: Iterable[Subcommand], program: str = "fedmount") -> str:
    """The "subcommands" paragraph of a ``--help``, wrapped at 90 columns."""
    wrap = {"break_on_hyphens": False, "break_long_words": False}
    lines = ["subcommands (each has its own --help):"]
    for c in commands:
        lines += textwrap.wrap(f"{program} {c.name} {c.synopsis}", 90, initial_indent="  ",
                               subsequent_indent="        ", **wrap)
        lines += textwrap.wrap(c.description, 90, initial_indent="      ", subsequent_indent="      ", **wrap)
    return "\n".join(lines)
