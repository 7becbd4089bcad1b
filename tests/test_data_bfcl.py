"""Real data (issue 4): BFCL v3 items whose every argument has a single accepted value become
unified records, and their ground-truth completions score 1 under the binary reward."""

import json

import pytest
from bfcl_data_facts import BFCL_CATEGORY_SIZES

from tooln1_jax.data.bfcl import (
    AST_CATEGORIES,
    bfcl_data_dir,
    load_category,
    possible_answer_calls,
    single_answer_records,
    to_record,
)
from tooln1_jax.data.prompt import build_messages, format_completion
from tooln1_jax.data.records import ToolRecord
from tooln1_jax.rewards import tool_call_reward

# Per category: items whose every argument has exactly one accepted value (nvidia-bfcl 26.3 data).
SINGLE_ANSWER_COUNTS = {
    "simple": 137,
    "java": 97,
    "javascript": 45,
    "multiple": 64,
    "parallel": 77,
    "parallel_multiple": 49,
    "live_simple": 126,
    "live_multiple": 440,
    "live_parallel": 2,
    "live_parallel_multiple": 6,
}
CATEGORY_SIZES = {c: BFCL_CATEGORY_SIZES[c] for c in AST_CATEGORIES}


@pytest.fixture(scope="module")
def single():
    return single_answer_records()


def _category(record_id: str) -> str:
    return record_id.split("#")[0].rsplit("_", 1)[0]


def test_single_answer_records_are_counted(single):
    records, drops = single
    counts = {c: 0 for c in AST_CATEGORIES}
    for r in records:
        counts[_category(r.id)] += 1
    assert counts == SINGLE_ANSWER_COUNTS
    assert len(records) == 1043
    assert dict(drops) == {"multiple_accepted_values": sum(CATEGORY_SIZES.values()) - 1043}


def test_ground_truth_completions_score_one(single):
    records, _ = single
    rewards = [
        tool_call_reward(
            format_completion(r.answer, "The request maps to these calls."), json.dumps(r.answer), "binary"
        )
        for r in records
    ]
    assert len(rewards) == 1043 and all(x == 1.0 for x in rewards)
    # ... and a wrong value on the same records scores 0 (the reward really compares values).
    wrong = 0
    for r in records:
        if r.answer and r.answer[0]["arguments"]:
            bad = json.loads(json.dumps(r.answer))
            key = sorted(bad[0]["arguments"])[0]
            bad[0]["arguments"][key] = ["not", "this"]
            wrong += tool_call_reward(format_completion(bad, "x"), r.answer, "binary")
    assert wrong == 0.0


def test_answers_are_the_single_accepted_values(single):
    records, _ = single
    truth = {}
    for category in AST_CATEGORIES:
        for item in load_category(category).items:
            truth[item.id] = item
    for r in records:
        item = truth[r.id]
        assert len(r.answer) == len(item.ground_truth)
        for call, gt in zip(r.answer, item.ground_truth):
            ((name, options),) = gt.items()
            assert call["name"] == name
            required = next(f for f in item.functions if f["name"] == name)["parameters"].get("required", [])
            for key, accepted in options.items():
                assert len(accepted) == 1
                if accepted == [""] and key not in required:
                    assert key not in call["arguments"]
                else:
                    assert _matches(call["arguments"][key], accepted[0]), (r.id, key)


def _is_option_map(option):
    return isinstance(option, dict) and all(isinstance(v, list) for v in option.values())


def _matches(value, option) -> bool:
    """value is the single accepted `option` (option maps {k: [v]} read one level deep)."""
    if _is_option_map(option):
        kept = {k: v[0] for k, v in option.items() if v != [""]}
        return isinstance(value, dict) and set(value) == set(kept) and all(_matches(value[k], kept[k]) for k in kept)
    if isinstance(option, list) and option and all(_is_option_map(o) for o in option):
        return isinstance(value, list) and len(value) == len(option) and all(map(_matches, value, option))
    return value == option


def test_record_fields_keep_the_bfcl_item():
    item = next(i for i in load_category("live_simple").items if any(m["role"] == "system" for m in i.question))
    record = to_record(item, possible_answer_calls(item.ground_truth, strict=False, functions=item.functions))
    assert isinstance(record, ToolRecord) and record.source == "bfcl" and record.id == item.id
    assert record.system == "\n\n".join(m["content"] for m in item.question if m["role"] == "system")
    assert [t["role"] for t in record.conversations] == [m["role"] for m in item.question if m["role"] != "system"]
    assert record.tools == item.functions  # unchanged
    # BFCL and Java types stay as shipped (no translation to JSON-schema names)
    java = load_category("java").items[0]
    assert to_record(java, []).tools[0]["parameters"]["properties"]["controller"]["type"] == "any"
    assert to_record(java, []).tools[0]["parameters"]["type"] == "dict"
    messages = build_messages(record)
    assert messages[0]["role"] == "system" and item.functions[0]["name"] in messages[0]["content"]


def test_nested_option_maps_and_omitted_arguments():
    gt = [{"f": {"a": [1], "opt": [""], "d": [{"x": ["u"], "y": [""]}], "l": [[{"k": [True]}]]}}]
    docs = [{"name": "f", "parameters": {"required": ["a"], "properties": {}}}]
    assert possible_answer_calls(gt, strict=True, functions=docs) == [
        {"name": "f", "arguments": {"a": 1, "d": {"x": "u"}, "l": [{"k": True}]}}
    ]
    assert possible_answer_calls([{"f": {"a": [1, 2]}}], strict=True) is None
    assert possible_answer_calls([{"f": {"a": [1, 2], "b": ["", 3]}}], strict=False) == [
        {"name": "f", "arguments": {"a": 1}}
    ]
    # a required argument whose only accepted value is "" is given as ""
    assert possible_answer_calls([{"f": {"a": [""]}}], strict=True, functions=docs) == [
        {"name": "f", "arguments": {"a": ""}}
    ]
    assert possible_answer_calls([{"f": {"a": []}}], strict=False) is None  # nothing is accepted


def test_id_quirks_of_the_shipped_data():
    live_multiple = load_category("live_multiple")
    assert live_multiple.id_mismatches == [("live_multiple_1052-79-0", "live_multiple_1052-279-0")]
    assert len(live_multiple.items) == 1053
    relevance = load_category("live_relevance")
    assert relevance.renamed_duplicates == [("live_relevance_3-3-0", "live_relevance_3-3-0#2")]
    assert len({i.id for i in relevance.items}) == len(relevance.items) == 18


def test_misaligned_answer_file_is_an_error(tmp_path):
    src = bfcl_data_dir()
    (tmp_path / "possible_answer").mkdir()
    lines = open(f"{src}/BFCL_v3_simple.json").read().splitlines()[:3]
    answers = open(f"{src}/possible_answer/BFCL_v3_simple.json").read().splitlines()[:3]
    (tmp_path / "BFCL_v3_simple.json").write_text("\n".join(lines) + "\n")
    (tmp_path / "possible_answer" / "BFCL_v3_simple.json").write_text(
        "\n".join([answers[0], answers[2], answers[1]]) + "\n"
    )
    with pytest.raises(
        ValueError, match=r"BFCL_v3_simple.json:2: answer id 'simple_2' does not belong to question 'simple_1'"
    ):
        load_category("simple", str(tmp_path))
    (tmp_path / "possible_answer" / "BFCL_v3_simple.json").write_text("\n".join(answers[:2]) + "\n")
    with pytest.raises(ValueError, match="has 3 items but"):
        load_category("simple", str(tmp_path))
