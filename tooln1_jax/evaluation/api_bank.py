"""API-Bank level-1, call mode: items -> Tool-N1 prompts, and exact-match scoring.

Data: the authors' `level-1-api.json` (a JSON list; each item has `file`, `id`, `instruction`
= task text + "API descriptions:" + one JSON API per line, `input` = the dialogue so far ending
in "Generate API Request:", `expected_output` = `API-Request: [ApiName(key='value', ...)]`).
Item ids repeat across dialogue files, so an item is keyed `<file without .jsonl>:<id>`.

Prompt: the APIs become tools (`{name, description, parameters: input_parameters}`, the flat
xLAM form the model is trained on); the dialogue becomes turns: "User:" -> user, "AI:" ->
assistant, and an earlier `API-Request: [...]->result` line -> an assistant call (a
`<tool_call>` block) followed by a tool message with the result. The task text's "The current
year is 2023." is kept as the system text (expected dates depend on it); its request-format line
is not (the model answers in the Tool-N1 format).

Scoring: the first `<tool_call>` block must hold exactly one call whose name and arguments equal
the expected ones. The expected request is parsed with `ast` literals only. API-Bank writes
every value as a Python string literal (all values in level-1, also for int, bool and list
parameters), so values are compared in that form: a JSON number or bool counts as its Python
text (3 -> "3", true -> "True"), and a list / dict is compared by structure, whether written as
a literal or as a string holding one (31 expected requests quote a list literal that itself has
quotes, `health_data='[{'name': ...}]'`; they are split by a quote-aware scanner).

"Multi-turn cases excluded" (the paper): the data does not mark such cases. Here an item is
multi-turn when its dialogue already holds an earlier API call and its result (`API-Request:`
in `input`): 187 of the 399 items, all with item id > 0, i.e. not the first call of their
dialogue. The headline `api_bank` figure covers the other 212; `api_bank_all` covers all 399.
(The paper's two Tool-N1 figures, 81.28 and 82.19, are both k/219, so its subset had 219 items:
close to, but not, this rule's 212. The exact rule is not published.)
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from tooln1_jax.data.json_files import DataFileError, json_values
from tooln1_jax.data.records import ToolRecord, tool_call_block
from tooln1_jax.rewards import parse_tool_calls

SOURCE = "api_bank"
SUBSET = "api_bank"  # first call of a dialogue: the paper's "multi-turn cases excluded"
ALL = "api_bank_all"


@dataclasses.dataclass(frozen=True)
class ApiBankItem:
    id: str
    apis: list[dict]
    turns: list[dict]  # {role, content}, in the unified record's form
    system: str
    expected_name: str
    expected_arguments: dict
    multi_turn: bool  # the dialogue already holds an earlier API call


# ---- parsing API-Bank's call syntax (literals only, never evaluated) --------------------------

_CALL = re.compile(r"^\s*\[\s*([A-Za-z_][\w.]*)\s*\((.*)\)\s*\]\s*$", re.DOTALL)
_NEXT_KEY = re.compile(r"\s*,\s*[A-Za-z_]\w*\s*=")
_KEY = re.compile(r"\s*([A-Za-z_]\w*)\s*=\s*")
_COMMA = re.compile(r"\s*,")


def _scan_arguments(text: str) -> dict[str, Any] | None:
    """`k1='v1', k2=3` -> {k1: 'v1', k2: 3}, tolerating quotes inside a quoted value: a quoted
    value ends at the first matching quote that is followed by `, key=` or the end."""
    args: dict[str, Any] = {}
    pos = 0
    while pos < len(text):
        m = _KEY.match(text, pos)
        if m is None:
            return None if text[pos:].strip() else args
        key, pos = m.group(1), m.end()
        if pos < len(text) and text[pos] in "'\"":
            quote, end = text[pos], None
            for i in range(pos + 1, len(text)):
                if text[i] == quote and (
                    i + 1 == len(text) or _NEXT_KEY.match(text, i + 1) or not text[i + 1 :].strip()
                ):
                    end = i
                    break
            if end is None:
                return None
            raw = text[pos : end + 1]
            try:
                args[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                args[key] = raw[1:-1]  # inner quotes clash with the outer ones: keep the text
            pos = end + 1
        else:
            nxt = _NEXT_KEY.search(text, pos)
            end = nxt.start() if nxt else len(text)
            try:
                args[key] = ast.literal_eval(text[pos:end].strip())
            except (ValueError, SyntaxError):
                return None
            pos = end
        comma = _COMMA.match(text, pos)
        if comma:
            pos = comma.end()
    return args


def parse_api_request(text: str) -> tuple[str, dict] | None:
    """`[ApiName(key='value', ...)]` (an `API-Request:` prefix and a `->result` tail allowed) ->
    (name, arguments), or None. `ast` literals only; a lenient scanner handles the dataset's
    quoted list literals."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if text.startswith("API-Request:"):
        text = text[len("API-Request:") :].strip()
    if "]->" in text:
        text = text[: text.index("]->") + 1]
    try:
        tree = ast.parse(text, mode="eval").body
        if (
            isinstance(tree, ast.List)
            and len(tree.elts) == 1
            and isinstance(tree.elts[0], ast.Call)
            and not tree.elts[0].args
        ):
            call = tree.elts[0]
            name = ast.unparse(call.func)
            return name, {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError, TypeError, RecursionError):
        pass
    m = _CALL.match(text)
    if m is None:
        return None
    args = _scan_arguments(m.group(2))
    return None if args is None else (m.group(1), args)


def canonical_value(value: Any) -> Any:
    """The comparison form of a value (see the module doc)."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped[:1] in "[{" and stripped[-1:] in "]}":
            try:
                parsed = ast.literal_eval(stripped)
            except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
                try:
                    parsed = json.loads(stripped)
                except (ValueError, RecursionError):
                    return value
            if isinstance(parsed, (list, dict)):
                return canonical_value(parsed)
        return value
    if isinstance(value, bool) or value is None or isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return [canonical_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): canonical_value(v) for k, v in value.items()}
    return repr(value)


# ---- items and prompts ------------------------------------------------------------------------

_TURN = re.compile(r"^(User|AI|API-Request|Generate API Request):\s?(.*)$")


def _dialogue_turns(text: str, where: str) -> list[dict]:
    turns: list[dict] = []
    for line in text.split("\n"):
        m = _TURN.match(line)
        if m is None:  # a continuation line of the previous utterance
            if line.strip() and turns:
                turns[-1]["content"] += "\n" + line
            continue
        kind, content = m.groups()
        if kind == "User":
            turns.append({"role": "user", "content": content})
        elif kind == "AI":
            turns.append({"role": "assistant", "content": content})
        elif kind == "API-Request":
            request, _, result = content.partition("->")
            parsed = parse_api_request(request)
            if parsed is None:
                raise ValueError(f"{where}: cannot parse the earlier call {request[:120]!r}")
            turns.append(
                {"role": "assistant", "content": tool_call_block([{"name": parsed[0], "arguments": parsed[1]}])}
            )
            turns.append({"role": "tool", "content": result})
    return turns


def _item(row: dict, where: str) -> ApiBankItem:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a JSON {type(row).__name__}, not an item object")
    for key in ("file", "id", "instruction", "input", "expected_output"):
        if key not in row:
            raise ValueError(f"{where}: missing field {key!r}")
    head, sep, api_text = row["instruction"].partition("API descriptions:")
    if not sep:
        raise ValueError(f"{where}: instruction has no 'API descriptions:' section")
    apis = []
    for line in api_text.strip().splitlines():
        if line.strip():
            try:
                api = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: API description is not JSON ({e})") from None
            apis.append(
                {
                    "name": api["name"],
                    "description": api.get("description", ""),
                    "parameters": api.get("input_parameters", {}),
                }
            )
    expected = parse_api_request(row["expected_output"])
    if expected is None:
        raise ValueError(f"{where}: cannot parse expected_output {row['expected_output'][:120]!r}")
    system = "\n".join(
        line for line in head.split("Input:")[0].splitlines() if line.strip() and "format of [ApiName" not in line
    )
    file_stem = row["file"][: -len(".jsonl")] if row["file"].endswith(".jsonl") else row["file"]
    return ApiBankItem(
        id=f"{file_stem}:{row['id']}",
        apis=apis,
        turns=_dialogue_turns(row["input"], where),
        system=system,
        expected_name=expected[0],
        expected_arguments=expected[1],
        multi_turn="API-Request:" in row["input"],
    )


def load_api_bank(path: str) -> list[ApiBankItem]:
    """All items of a level-1 file (a JSON list, or JSON lines)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"API-Bank data not found: {path} (give the path to level-1-api.json)")
    is_list, values, bad_lines = json_values(path, "API-Bank items")
    if bad_lines:
        number, error = bad_lines[0]
        raise DataFileError(f"{path}:{number}: not JSON ({error})")
    if not values:
        raise DataFileError(f"{path}: no API-Bank items")
    located = [(row, f"{path}: item {i}" if is_list else f"{path}:{i}") for i, row in values]
    items = [_item(row, where) for row, where in located]
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise ValueError(f"{path}: duplicate item {item.id!r}")
        seen.add(item.id)
    return items


def prompt_record(item: ApiBankItem) -> ToolRecord:
    return ToolRecord(
        source=SOURCE,
        id=item.id,
        system=item.system,
        tools=list(item.apis),
        conversations=[dict(t) for t in item.turns],
        answer=[{"name": item.expected_name, "arguments": item.expected_arguments}],
    )


# ---- scoring ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ApiBankResult:
    id: str
    multi_turn: bool
    valid: bool
    calls: list | None
    error_type: str | None
    completion: str | None = None  # the text scored, so a failure shows what the model wrote

    def to_dict(self) -> dict:
        """The fields, not deep-copied (`dataclasses.asdict` recurses into `calls`, which a model
        can nest as deep as `json` parses)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def score_item(item: ApiBankItem, completion: str) -> ApiBankResult:
    """Exact name-and-arguments match of the single call in the first `<tool_call>` block; the
    result carries the completion."""
    return dataclasses.replace(_verdict(item, completion), completion=completion)


def _verdict(item: ApiBankItem, completion: str) -> ApiBankResult:
    calls = parse_tool_calls(completion, block="first")
    if calls is None:
        return ApiBankResult(item.id, item.multi_turn, False, None, "no_valid_tool_call")
    if len(calls) != 1:
        return ApiBankResult(item.id, item.multi_turn, False, calls, "wrong_call_count")
    call = calls[0]
    if call["name"] != item.expected_name:
        return ApiBankResult(item.id, item.multi_turn, False, calls, "wrong_name")
    try:
        same = isinstance(call["arguments"], dict) and canonical_value(call["arguments"]) == canonical_value(
            item.expected_arguments
        )
    except RecursionError:  # nested deeper than any expected value can be
        same = False
    if not same:
        return ApiBankResult(item.id, item.multi_turn, False, calls, "wrong_arguments")
    return ApiBankResult(item.id, item.multi_turn, True, calls, None)


def summarize(results: Sequence[ApiBankResult]) -> dict:
    """`api_bank` (multi-turn cases excluded) and `api_bank_all`: {"accuracy", "correct", "total"}."""

    def score(rs: list[ApiBankResult]) -> dict:
        correct = sum(r.valid for r in rs)
        return {"accuracy": round(100.0 * correct / len(rs), 2) if rs else None, "correct": correct, "total": len(rs)}

    single = [r for r in results if not r.multi_turn]
    return {
        SUBSET: {**score(single), "covers": "items whose dialogue has no earlier API call"},
        ALL: {**score(list(results)), "covers": "all items"},
    }


def oracle_completion(item: ApiBankItem, reasoning: str = "oracle") -> str:
    call = {"name": item.expected_name, "arguments": item.expected_arguments}
    return f"<think>{reasoning}</think>\n{tool_call_block([call])}"


def items_by_id(items: Iterable[ApiBankItem]) -> dict[str, ApiBankItem]:
    return {item.id: item for item in items}
