"""man/fedmount-run.1 and `fedmount-run --help` say the same things in the same words."""

from __future__ import annotations

import re
from pathlib import Path

from fedmount.runner.cli import DESCRIPTION, EPILOG, build_parser

MAN = Path(__file__).resolve().parent.parent / "man" / "fedmount-run.1"


def _words(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _man_text() -> str:
    source = MAN.read_text(encoding="utf-8").replace("\\-", "-")
    return _words(" ".join(line for line in source.splitlines() if not line.startswith(".")))


def test_every_help_sentence_is_in_the_man_page():
    man = _man_text()
    parser = build_parser()
    helps = [a.help for a in parser._actions if a.help]
    paragraphs = [DESCRIPTION] + [
        _words(" ".join(block.splitlines()[1:])) for block in EPILOG.strip().split("\n\n")
    ]
    for text in helps + paragraphs:
        assert _words(text) in man, text


def test_every_option_and_epilog_section_is_in_the_man_page():
    source = MAN.read_text(encoding="utf-8").replace("\\-", "-")
    for action in build_parser()._actions:
        for option in action.option_strings:
            assert option in source, option
    for block in EPILOG.strip().split("\n\n"):
        title = block.splitlines()[0].rstrip(":").upper()
        assert f".SH {title}" in source, title
