"""Decode a large JSON answer in small steps, so that no step holds the GIL for long.

`json.loads` is one C call, and no other thread runs Python while it runs: a 200 MB
collection record takes 0.44 s here, during which the trio thread (every FUSE request of
the mount) waits, even when the decode runs in a worker thread. An API answer is one
object whose bulk is one or two strings (``manifest_text``, a ``description``). `loads`
walks that top-level object itself and decodes each long string in pieces of about
`STEP` characters, each ending after a space (a space in a JSON string is always itself,
never part of an escape, so every piece decodes alone and the pieces join into the
string); a string with no space for longer than that is decoded in one piece. Every
other value (numbers, arrays, nested objects, short strings) goes to `json`'s own decoder.
The body is turned into text in steps too (UTF-8, or what `json.detect_encoding` finds),
and consumed: its buffer is emptied once it is text, so the body, the text and the
decoded strings are never all alive at once.

The result is what `json.loads` gives for the same bytes (a test compares them); invalid
JSON raises `ValueError`, as `json.loads` does.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any

STEP = 1 << 20  # characters decoded by one call
_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def loads(body: bytearray, step: int = STEP) -> Any:
    """The JSON value of `body`, decoded `step` characters at a time; `body` is emptied."""
    text = _text(body, step)
    i = _skip(text, 0)
    if not text.startswith("{", i):
        return _DECODER.decode(text)
    out: dict[str, Any] = {}
    i = _skip(text, i + 1)
    if text.startswith("}", i):
        return _end(text, i + 1, out)
    while True:
        if not text.startswith('"', i):
            raise ValueError(f"expected a string key at character {i}")
        key, i = _string(text, i, step)
        i = _skip(text, i)
        if not text.startswith(":", i):
            raise ValueError(f"expected ':' at character {i}")
        i = _skip(text, i + 1)
        if text.startswith('"', i):
            out[key], i = _string(text, i, step)
        else:
            out[key], i = _DECODER.raw_decode(text, i)
        i = _skip(text, i)
        if text.startswith("}", i):
            return _end(text, i + 1, out)
        if not text.startswith(",", i):
            raise ValueError(f"expected ',' or '}}' at character {i}")
        i = _skip(text, i + 1)


def _text(body: bytearray, step: int) -> str:
    """`body` decoded as `json.loads` decodes bytes, `step` bytes at a time; emptied."""
    decoder = codecs.getincrementaldecoder(json.detect_encoding(body))("surrogatepass")
    view = memoryview(body)
    pieces = [decoder.decode(view[i : i + step]) for i in range(0, len(body), step)]
    pieces.append(decoder.decode(b"", final=True))
    view.release()
    del body[:]
    return "".join(pieces)


def _skip(text: str, i: int) -> int:
    match = _SPACE.match(text, i)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _end(text: str, i: int, value: dict[str, Any]) -> dict[str, Any]:
    if _skip(text, i) != len(text):
        raise ValueError(f"extra data at character {i}")
    return value


def _string(text: str, i: int, step: int) -> tuple[str, int]:
    """The string whose opening quote is at `i`, and the index after its closing quote."""
    close = _closing_quote(text, i + 1, step)
    if close - i <= step:
        return json.loads(text[i : close + 1]), close + 1
    pieces = []
    start = i + 1
    while start < close:
        space = text.find(" ", start + step, close)
        stop = close if space < 0 else space + 1
        pieces.append(json.loads(f'"{text[start:stop]}"'))
        start = stop
    return "".join(pieces), close + 1


def _closing_quote(text: str, i: int, step: int) -> int:
    """The index of the quote that ends the string whose content starts at `i`: the first
    quote after an even number of backslashes (an odd number escapes it)."""
    while True:
        quote = text.find('"', i, i + step)
        if quote < 0:
            if i + step >= len(text):
                raise ValueError("unterminated string")
            i += step
            continue
        before = quote
        while text[before - 1] == "\\":
            before -= 1
        if (quote - before) % 2 == 0:
            return quote
        i = quote + 1
