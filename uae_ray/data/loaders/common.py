"""Record types, the input error, counters and streaming readers shared by every loader.

Loaders turn one input file into a stream of :class:`Chunk` objects: a few passages plus the queries whose gold
passages are among them (one QASPER paper, one SQuAD paragraph, one MRQA context; the generic format is one chunk).
They validate as they read: a structural problem is a :class:`DataError` naming file, line/record and field (fatal);
a well-formed record that cannot be used (unanswerable, no gold passage, ...) is a counted skip in :class:`LoadStats`.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

T = TypeVar("T")

#: How many characters the streaming JSON reader pulls per read.
READ_CHARS = 1 << 20


class DataError(ValueError):
    """Unusable input: the message names the file, the line or record, and the field.

    Args:
        source: the input file (or dataset id).
        where: ``line 12``, ``row 3``, ``paper 1503.00841 / question 2``, ... (None: the whole file).
        field: the offending field (None: the record itself).
        message: what is wrong.
    """

    def __init__(self, source: str | Path, where: str | None, field: str | None, message: str) -> None:
        self.source, self.where, self.field, self.message = str(source), where, field, message
        parts = [self.source, *([where] if where else []), *([f"field {field!r}"] if field else []), message]
        super().__init__(": ".join(parts))


@dataclass(frozen=True)
class Passage:
    """One passage before windowing; ``pid`` is stable (derived from ids and positions, never from order of runs)."""

    pid: str
    doc_id: str
    title: str | None
    text: str


@dataclass(frozen=True)
class Query:
    """One usable question.

    Attributes:
        gold_pids: pids of gold passages (before windowing) in the same chunk.
        match_texts: strings that mark which windows of a split gold passage stay gold (answer spans).
        split: train/dev/test from the input spec or the record; None -> assigned by document hash.
        no_gold_reason: why ``gold_pids`` is empty (a skip reason when gold is required).
        where: the record's location, for error messages.
    """

    qid: str
    doc_id: str
    question: str
    answers: tuple[str, ...]
    gold_pids: tuple[str, ...]
    match_texts: tuple[str, ...] = ()
    split: str | None = None
    no_gold_reason: str | None = None
    where: str = ""


@dataclass
class Chunk:
    """Passages plus the queries whose gold pids all refer to these passages.

    ``split`` (from the input spec / hub split) is the split of every document in the chunk; None: by the queries'
    own split, else by document hash.
    """

    passages: list[Passage] = field(default_factory=list)
    queries: list[Query] = field(default_factory=list)
    split: str | None = None

    def add_passage(self, passage: Passage, stats: LoadStats) -> bool:
        """Count the passage as read and keep it, or count it skipped as ``empty_text``; True when kept."""
        stats.passages_read += 1
        if not passage.text.strip():
            stats.passages_skipped["empty_text"] += 1
            return False
        self.passages.append(passage)
        return True


@dataclass
class LoadStats:
    """Counters filled by loaders and the prepare stage; all end up in ``prepare_report.json``.

    Attributes:
        queries_read: question records read (kept + skipped).
        passages_read: passage records read (before windowing).
        skipped: skipped questions per reason.
        passages_skipped: skipped passages per reason.
        notes: other counts worth seeing (evidence resolved, answer offsets corrected, ...).
    """

    queries_read: int = 0
    passages_read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    passages_skipped: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)


# ------------------------------------------------------------------------------------------------ field validation
_TYPE_NAMES = {str: "a string", list: "a list", dict: "an object", bool: "a boolean", int: "an integer"}


def get_field(
    record: Any, key: str, typ: type[T], *, source: str | Path, where: str, required: bool = True,
    default: T | None = None, prefix: str = "",
) -> T:
    """``record[key]`` checked to be a ``typ``; missing (or null) and not required -> ``default``.

    Raises:
        DataError: the record is not an object, the field is missing (and required) or has the wrong type.
    """
    name = f"{prefix}{key}"
    if not isinstance(record, dict):
        raise DataError(source, where, prefix.rstrip(".") or None, f"expected an object, got {type(record).__name__}")
    value = record.get(key)
    if value is None:
        if required:
            raise DataError(source, where, name, "missing")
        return default  # type: ignore[return-value]
    if (typ is int and isinstance(value, bool)) or not isinstance(value, typ):
        expected = _TYPE_NAMES.get(typ, typ.__name__)
        raise DataError(source, where, name, f"expected {expected}, got {type(value).__name__}")
    return value


def get_str_list(record: Any, key: str, *, source: str | Path, where: str, required: bool = True,
                 prefix: str = "") -> list[str]:
    """``record[key]`` as a list of strings (missing and not required -> [])."""
    values = get_field(record, key, list, source=source, where=where, required=required, default=[], prefix=prefix)
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise DataError(source, where, f"{prefix}{key}[{i}]", f"expected a string, got {type(v).__name__}")
    return values


def get_question(record: Any, key: str, *, source: str | Path, where: str, prefix: str = "") -> str:
    """A non-empty question string (whitespace stripped)."""
    text = get_field(record, key, str, source=source, where=where, prefix=prefix).strip()
    if not text:
        raise DataError(source, where, f"{prefix}{key}", "empty question")
    return text


def normalize_ws(text: str) -> str:
    """Collapse runs of whitespace to one space and strip (for robust evidence matching)."""
    return " ".join(text.split())


def dedup(items: list[str]) -> tuple[str, ...]:
    """Unique non-empty stripped strings, first occurrence order."""
    return tuple(dict.fromkeys(s.strip() for s in items if s and s.strip()))


# ---------------------------------------------------------------------------------------------------- file reading
def open_binary(path: Path) -> BinaryIO:
    """Open ``path`` for binary reading, transparently gunzipping (by magic bytes, not by suffix)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file (gz or not).

    Raises:
        DataError: a line that is not UTF-8, not JSON, or not a JSON object.
    """
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading byte-order mark is fine
            except UnicodeDecodeError as e:
                raise DataError(path, f"line {lineno}", None, f"not valid UTF-8 (byte {e.start} of the line)") from e
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(path, f"line {lineno}", None, f"invalid JSON: {e.msg} (column {e.colno})") from e
            if not isinstance(obj, dict):
                raise DataError(path, f"line {lineno}", None, f"expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def load_json(path: Path) -> Any:
    """A whole JSON document; UTF-8 and syntax errors name the file and line."""
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    with open_binary(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(path, f"line {line}", None, f"not valid UTF-8 (byte offset {e.start})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {e.lineno}", None, f"invalid JSON: {e.msg} (column {e.colno})") from e
