"""xLAM function-calling-60k rows -> unified records.

A row is `{"id", "query", "tools": <JSON string: [{name, description, parameters}]>,
"answers": <JSON string: [{name, arguments}]>}`; one row is one single-turn sample.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from tooln1_jax.data.records import DropCounts, ToolRecord, unknown_tool_names


def _json_field(value: Any) -> Any:
    """A JSON-string field decoded (already-decoded values pass through); None if invalid."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def _answer(value: Any) -> list[dict] | None:
    calls = _json_field(value)
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list):
        return None
    out = []
    for call in calls:
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
            return None
        arguments = _json_field(call.get("arguments", {}))
        if not isinstance(arguments, dict):
            return None
        out.append({"name": call["name"], "arguments": arguments})
    return out


def convert_row(row: dict, index: int, drops: DropCounts, source: str = "xlam") -> ToolRecord | None:
    """One xLAM row -> a record, or None with the reason added to `drops`."""
    query = row.get("query")
    if not isinstance(query, str) or not query.strip():
        drops["no_query"] += 1
        return None
    tools = _json_field(row.get("tools"))
    if not (
        isinstance(tools, list) and tools and all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools)
    ):
        drops["no_tools"] += 1
        return None
    answer = _answer(row.get("answers"))
    if answer is None:
        drops["bad_answer"] += 1
        return None
    if unknown_tool_names(answer, tools):
        drops["unknown_tool"] += 1
        return None
    return ToolRecord(
        source=source,
        id=str(row.get("id", index)),
        system="",
        tools=tools,
        conversations=[{"role": "user", "content": query}],
        answer=answer,
    )


def convert_rows(rows: Iterable[dict], source: str = "xlam") -> tuple[list[ToolRecord], DropCounts]:
    """xLAM rows -> (records, drop counts: no_query, no_tools, bad_answer, unknown_tool)."""
    drops, records = DropCounts(), []
    for index, row in enumerate(rows):
        record = convert_row(row, index, drops, source)
        if record is not None:
            records.append(record)
    return records, drops
