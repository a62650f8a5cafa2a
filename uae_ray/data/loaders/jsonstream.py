"""Stream the members of a top-level JSON object (``{key: value, ...}``) one at a time.

QASPER's official files are one object keyed by paper id (train: 27 MB of JSON, a few hundred MB as Python objects).
This reader holds at most a read buffer plus the one member being parsed, so memory does not grow with the file.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from uae_ray.data.loaders.common import READ_CHARS, DataError, open_binary

_WS = " \t\r\n"


class _Buffer:
    """Decoded text of the file from ``base`` on, with line bookkeeping for error messages."""

    def __init__(self, path: Path, read_chars: int) -> None:
        self.path = path
        self.file = open_binary(path)
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")  # a leading byte-order mark is fine
        self.read_chars = read_chars
        self.bytes_read = 0
        self.text = ""
        self.pos = 0
        self.line = 1  # line number at self.pos
        self.eof = False

    def close(self) -> None:
        self.file.close()

    def more(self) -> bool:
        """Append the next block to the buffer (compacting consumed text first); False at end of file."""
        if self.eof:
            return False
        if self.pos > len(self.text) // 2:
            self.text, self.pos = self.text[self.pos :], 0
        raw = self.file.read(self.read_chars)
        try:
            self.text += self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            raise DataError(self.path, f"byte offset {self.bytes_read + e.start}", None, "not valid UTF-8") from e
        self.bytes_read += len(raw)
        if not raw:
            self.eof = True
        return bool(raw)

    def advance(self, new_pos: int) -> None:
        self.line += self.text.count("\n", self.pos, new_pos)
        self.pos = new_pos

    def peek(self) -> str:
        """The next non-whitespace character ('' at end of file), consuming the whitespace."""
        while True:
            i = self.pos
            while i < len(self.text) and self.text[i] in _WS:
                i += 1
            self.advance(i)
            if i < len(self.text):
                return self.text[i]
            if not self.more():
                return ""

    def expect(self, chars: str, what: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            found = repr(c) if c else "end of file"
            raise DataError(self.path, f"line {self.line}", None, f"invalid JSON: expected {what}, found {found}")
        self.advance(self.pos + 1)
        return c

    def value(self, decoder: json.JSONDecoder, key: str | None) -> Any:
        """Decode one JSON value at the current position, reading more text until it is complete."""
        self.peek()
        while True:
            try:
                obj, end = decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as e:
                if self.more():
                    continue
                line = self.line + self.text.count("\n", self.pos, e.pos)
                raise DataError(self.path, f"line {line}", key, f"invalid JSON: {e.msg}") from e
            if end == len(self.text) and self.more():  # a number may continue in the next block
                continue
            self.advance(end)
            return obj


def iter_json_object(path: Path, *, read_chars: int = READ_CHARS) -> Iterator[tuple[str, Any, int]]:
    """(key, value, line of the value) for each member of the top-level JSON object in ``path`` (gz or not).

    Raises:
        DataError: not UTF-8, invalid JSON, not an object at top level, or a duplicate key.
    """
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    buf = _Buffer(path, read_chars)
    decoder = json.JSONDecoder()
    seen: set[str] = set()
    try:
        buf.expect("{", "a JSON object at top level")
        if buf.peek() == "}":
            buf.advance(buf.pos + 1)
        else:
            while True:
                key = buf.value(decoder, None)
                if not isinstance(key, str):
                    raise DataError(path, f"line {buf.line}", None, "invalid JSON: object key is not a string")
                if key in seen:
                    raise DataError(path, f"line {buf.line}", key, "duplicate key")
                seen.add(key)
                buf.expect(":", "':'")
                line = buf.line
                yield key, buf.value(decoder, key), line
                if buf.expect(",}", "',' or '}'") == "}":
                    break
        if buf.peek():
            raise DataError(path, f"line {buf.line}", None, "invalid JSON: extra data after the top-level object")
    finally:
        buf.close()
