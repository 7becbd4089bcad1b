"""ToolACE rows -> unified records.

A row is `{"system": str, "conversations": [{"from": user|assistant|tool, "value": str}, ...]}`.
The tools are a JSON array inside the system text, after "...in JSON format that you can invoke:".
Assistant calls are written as Python calls, `[Get Weather(city="Paris", days=3), Other(b=[1])]`,
where names may contain spaces. Each assistant call turn becomes one sample whose context is
every earlier turn (an earlier call re-written in our `<tool_call>` JSON format, a tool output as
a `tool` message). Call text is parsed with `ast` and literal walking only, never evaluated.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable
from typing import Any

from tooln1_jax.data.records import DropCounts, ToolRecord, tool_call_block, unknown_tool_names

TOOLS_MARKER = re.compile(r"in JSON format that you can invoke:", re.IGNORECASE)
# Lines of ToolACE's own answer-format instructions (Python-call syntax, "no other text"), which
# contradict the Tool-N1 format; the rest of the system text is kept.
_FOREIGN_FORMAT_LINE = re.compile(
    r"format of \[|func_?name\d*\(|func\d*\(|no other text|should not include any other text|"
    r"only return the function call|should you decide to return the function call",
    re.IGNORECASE,
)
# A call head: a name (letters, digits, spaces, `_ . - :` and similar, not brackets or quotes)
# directly followed by "(".
_CALL_HEAD = re.compile(r"\s*([^\W\d][^()\[\]{},=\"'\n]*?)\s*\(")
_ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
_JSON_WORDS = {"true": True, "false": False, "null": None, "none": None}


class CallSyntaxError(ValueError):
    """The text looks like a Python call list but is not one we can read as literals."""


def extract_tools(system: str) -> list[dict] | None:
    """The JSON tool list after the marker in a ToolACE system text (None if absent/invalid)."""
    match = TOOLS_MARKER.search(system or "")
    if match is None:
        return None
    start = system.find("[", match.end())
    if start < 0:
        return None
    try:
        tools, _ = json.JSONDecoder().raw_decode(system, start)
    except ValueError:
        return None
    if not isinstance(tools, list) or not tools:
        return None
    if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
        return None
    return tools


def system_preamble(system: str) -> str:
    """The system text before the tool-list sentence, minus ToolACE's own format instructions
    (our prompt lists the tools and states the answer format)."""
    match = TOOLS_MARKER.search(system or "")
    head = system[: system.rfind("\n", 0, match.start()) + 1] if match else (system or "")
    kept = [line for line in head.splitlines() if not _FOREIGN_FORMAT_LINE.search(line)]
    return "\n".join(kept).strip()


def _literal(node: ast.AST) -> Any:
    """A JSON value from a literal-only AST node (tuples become lists; true/false/null accepted)."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, bool, int, float))):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if k is None:
                raise CallSyntaxError("'**' inside a dict literal")
            key = _literal(k)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise CallSyntaxError(f"unhashable dict key {key!r}")
            out[key if isinstance(key, str) else json.dumps(key)] = _literal(v)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CallSyntaxError("sign applied to a non-number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Name) and node.id.lower() in _JSON_WORDS:
        return _JSON_WORDS[node.id.lower()]
    raise CallSyntaxError(f"not a literal: {ast.dump(node)[:80]}")


def _closing_paren(text: str, open_at: int) -> int:
    """Index of the ")" matching the "(" at `open_at`, skipping quoted strings and brackets."""
    depth, i, quote = 0, open_at, None
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                if ch != ")":
                    raise CallSyntaxError(f"mismatched bracket at {i}")
                return i
        i += 1
    raise CallSyntaxError("unclosed call")


def _arguments(arg_text: str) -> dict:
    try:
        tree = ast.parse(f"_call({arg_text})", mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CallSyntaxError(f"bad argument list: {e}") from None
    call = tree.body
    if not isinstance(call, ast.Call) or call.args:
        raise CallSyntaxError("positional arguments are not supported")
    out = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise CallSyntaxError("'**kwargs' is not supported")
        out[kw.arg] = _literal(kw.value)
    return out


def looks_like_calls(text: str) -> bool:
    """True for an assistant turn written as `[Name(...), ...]`."""
    text = text.strip()
    return text.startswith("[") and text.endswith("]") and _CALL_HEAD.match(text, 1) is not None


def parse_python_calls(text: str) -> list[dict]:
    """`[Get Weather(city="Paris"), Other(b=[1, 2])]` -> `[{"name", "arguments"}, ...]`.
    Raises CallSyntaxError on anything but a bracketed list of keyword-only literal calls."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise CallSyntaxError("not a bracketed call list")
    body, pos, calls = text[1:-1], 0, []
    while True:
        head = _CALL_HEAD.match(body, pos)
        if head is None:
            raise CallSyntaxError(f"expected a call at offset {pos}: {body[pos : pos + 40]!r}")
        open_at = head.end() - 1
        close_at = _closing_paren(body, open_at)
        calls.append({"name": head.group(1).strip(), "arguments": _arguments(body[open_at + 1 : close_at])})
        rest = body[close_at + 1 :].lstrip()
        if not rest:
            return calls
        if not rest.startswith(","):
            raise CallSyntaxError(f"expected ',' between calls, got {rest[:20]!r}")
        pos = len(body) - len(rest) + 1
        if not body[pos:].strip():  # trailing comma
            return calls


def _turns(row: dict) -> list[tuple[str, str]] | None:
    turns = []
    for turn in row.get("conversations") or []:
        if not isinstance(turn, dict):
            return None
        role = _ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        value = turn.get("value", turn.get("content"))
        if role is None or not isinstance(value, str):
            return None
        turns.append((role, value))
    return turns


def convert_row(row: dict, index: int, drops: DropCounts, source: str = "toolace") -> list[ToolRecord]:
    """All samples of one ToolACE row (one per assistant call turn); skips are added to `drops`."""
    tools = extract_tools(row.get("system") or "")
    if tools is None:
        drops["no_tools"] += 1
        return []
    turns = _turns(row)
    if turns is None or not turns:
        drops["bad_conversation"] += 1
        return []
    system = system_preamble(row["system"])
    row_id = str(row.get("id", index))
    context: list[dict] = []
    records: list[ToolRecord] = []
    call_turns = 0
    for turn_index, (role, value) in enumerate(turns):
        calls = None
        if role == "assistant" and looks_like_calls(value):
            call_turns += 1
            try:
                calls = parse_python_calls(value)
            except CallSyntaxError:
                drops["unparseable_call"] += 1
            else:
                if unknown_tool_names(calls, tools):
                    drops["unknown_tool"] += 1
                elif not any(t["role"] == "user" for t in context):
                    drops["no_user_turn"] += 1
                else:
                    records.append(
                        ToolRecord(
                            source=source,
                            id=f"{row_id}-{turn_index}",
                            system=system,
                            tools=tools,
                            conversations=list(context),
                            answer=calls,
                        )
                    )
        # An earlier call is context in our own answer format; unparseable ones stay as written.
        content = tool_call_block(calls) if calls is not None else value
        context.append({"role": role, "content": content})
    if call_turns == 0:
        drops["no_call_turn"] += 1
    return records


def convert_rows(rows: Iterable[dict], source: str = "toolace") -> tuple[list[ToolRecord], DropCounts]:
    """ToolACE rows -> (records, drop counts). Drops: no_tools, bad_conversation, no_call_turn
    (per row); unparseable_call, unknown_tool, no_user_turn (per call turn)."""
    drops, records = DropCounts(), []
    for index, row in enumerate(rows):
        records.extend(convert_row(row, index, drops, source))
    return records, drops
