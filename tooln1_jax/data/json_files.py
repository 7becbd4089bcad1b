"""Reading a JSON-list or JSON-lines data file, for training data (`sources`) and API-Bank
(`evaluation.api_bank`) alike: one reader, so an empty file, `[]` or a truncated JSON list is
the same one-line `DataFileError` everywhere, and a UTF-8 byte-order mark is accepted."""

from __future__ import annotations

import json
from typing import Any


class DataFileError(ValueError):
    """A data file with no usable row; the message names the file (and the line when known)."""


def json_values(path: str, what: str = "rows") -> tuple[bool, list[tuple[int, Any]], list[tuple[int, str]]]:
    """(is_list, values, bad_lines) of a data file that holds `what`.

    values: (position, value) pairs, the position being the index in a JSON list or the line
    number (from 1) in JSON lines. bad_lines: (line number, error) of JSON lines that do not
    parse, for the caller to drop and count, or to refuse. Raises DataFileError for an empty
    file and for a JSON list that is empty or does not parse (with its line and column)."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        raise DataFileError(f"{path}: empty file, no {what}")
    if data.lstrip().startswith(b"["):  # one JSON list
        try:
            items = json.loads(data)
        except json.JSONDecodeError as e:
            raise DataFileError(
                f"{path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); truncated?"
            ) from None
        except ValueError as e:  # UnicodeDecodeError
            line = data.count(b"\n", 0, getattr(e, "start", 0)) + 1
            raise DataFileError(f"{path}: line {line}: not valid JSON ({e})") from None
        if not items:
            raise DataFileError(f"{path}: no {what} (an empty JSON list)")
        return True, list(enumerate(items)), []
    values, bad = [], []
    for number, line in enumerate(data.splitlines(), 1):
        if line.strip():
            try:
                values.append((number, json.loads(line)))
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                bad.append((number, str(e)))
    return False, values, bad
