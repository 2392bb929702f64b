"""Reading a user's data files as text: whatever is wrong with a file is named with its path and line.

Python's readers fail far from the cause: a latin-1 byte raises UnicodeDecodeError with an offset into a read
buffer and no file name, and a JSON row with a lone surrogate escape (`"\\ud800"`) parses fine, then breaks
the tokenizer (or the cache's hash) with UnicodeEncodeError. Binary data (NUL bytes) would be tokenized as
if it were text. Each is a ValueError here, naming the file and its 1-based line (a .jsonl's row).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


def read_text_file(path) -> str:
    """The whole file as text (UTF-8, no NUL bytes)."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}: line {line}: {_not_utf8(data[e.start:e.end])}") from None
    if "\0" in text:
        raise ValueError(f"{path}: line {text.count(chr(10), 0, text.index(chr(0))) + 1}: {_BINARY}")
    return text


def jsonl_rows(path) -> Iterator[tuple[int, object]]:
    """(row number, parsed JSON value) for every non-blank line of a .jsonl file (blank lines are counted)."""
    with open(path, "rb") as f:
        for row, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: row {row}: {_not_utf8(raw[e.start:e.end])}") from None
            if not line.strip():
                continue
            if "\0" in line:
                raise ValueError(f"{path}: row {row}: {_BINARY}")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: row {row}: invalid JSON ({e.msg}, column {e.colno})") from None
            _check_unicode(obj, f"{path}: row {row}")
            yield row, obj


_BINARY = "a NUL byte: this is binary data, not text"


def _not_utf8(bad: bytes) -> str:
    return (f"not UTF-8 text (byte {bad[:4].hex(' ')}); if it is latin-1 or another encoding, convert it to UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)")


def _check_unicode(obj, where: str, field: str = "") -> None:
    """A lone surrogate from a `\\udXXX` escape without its pair is not Unicode text: name its field."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            at = f'field "{field}": ' if field else ""
            raise ValueError(f"{where}: {at}an unpaired surrogate escape {obj[e.start]!r} (\\u{ord(obj[e.start]):04x} "
                             "without its pair) is not valid Unicode text") from None
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _check_unicode(value, where, f"{field}.{key}" if field else str(key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            _check_unicode(value, where, f"{field}[{i}]")
