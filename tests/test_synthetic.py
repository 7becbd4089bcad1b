"""The synthetic tool-calling generator: determinism, schema, knobs, exact answers, reward 1."""

import dataclasses
import json
import string
from collections import Counter

import pytest

from tooln1_jax.data import synthetic
from tooln1_jax.data.prompt import format_completion
from tooln1_jax.data.synthetic import TOOLS, SyntheticConfig, generate, template_reasoning
from tooln1_jax.data.xlam import convert_rows
from tooln1_jax.rewards import tool_call_reward

BY_NAME = {t.name: t for t in TOOLS}
PY_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _calls(record):
    return json.loads(record["answers"])


def test_same_seed_same_records_other_seed_differs():
    cfg = SyntheticConfig(num_tools=5, max_calls=3)
    assert generate(60, cfg, seed=3) == generate(60, cfg, seed=3)
    assert generate(60, cfg, seed=3) != generate(60, cfg, seed=4)
    ids = [r["id"] for r in generate(10, cfg, seed=3, start_id=100)]
    assert ids == list(range(100, 110))


def test_records_follow_the_xlam_schema_and_types():
    for r in generate(300, SyntheticConfig(num_tools=5, max_calls=3), seed=1):
        assert set(r) == {"id", "query", "tools", "answers"}
        assert isinstance(r["tools"], str) and isinstance(r["answers"], str)
        tools = json.loads(r["tools"])
        assert len({t["name"] for t in tools}) == len(tools)
        schemas = {}
        for t in tools:
            assert set(t) == {"name", "description", "parameters"}
            for spec in t["parameters"].values():
                assert isinstance(spec["description"], str) and spec["description"]
                assert ("default" in spec) == spec["type"].endswith(", optional")
            schemas[t["name"]] = t["parameters"]
        for call in _calls(r):
            assert set(call) == {"name", "arguments"}
            params = schemas[call["name"]]  # every called tool is shown
            required = {p for p, s in params.items() if not s["type"].endswith(", optional")}
            assert required <= set(call["arguments"]) <= set(params)
            for p, value in call["arguments"].items():
                type_name = params[p]["type"].split(",")[0]
                if type_name == "List[str]":
                    assert isinstance(value, list) and value and all(isinstance(v, str) for v in value)
                else:  # exact Python type: a bool is not an int here, an int is not a float
                    assert type(value) is PY_TYPES[type_name], (p, value, type_name)


def test_answers_are_stated_in_the_query():
    """Every argument value is written in the query (booleans by one of their phrases), so the
    answer is derivable from query + tools alone."""
    for r in generate(300, SyntheticConfig(num_tools=4, max_calls=3, optional_prob=0.5), seed=2):
        query = r["query"]
        for call in _calls(r):
            params = {p.name: p for p in BY_NAME[call["name"]].params}
            for name, value in call["arguments"].items():
                p = params[name]
                if p.kind == "boolean":
                    assert any(phrase in query for phrase in p.phrases[value]), (query, name, value)
                    assert not any(phrase in query for phrase in p.phrases[not value]), (query, name, value)
                elif p.kind == "list":
                    assert all(item in query for item in value), (query, value)
                else:
                    assert str(value) in query, (query, name, value)


def test_difficulty_knobs_change_the_task():
    n = 200
    few = generate(n, SyntheticConfig(num_tools=2, min_calls=1, max_calls=1), seed=5)
    assert all(len(json.loads(r["tools"])) == 2 and len(_calls(r)) == 1 for r in few)
    many = generate(n, SyntheticConfig(num_tools=6, min_calls=3, max_calls=3), seed=5)
    assert all(len(json.loads(r["tools"])) == 6 and len(_calls(r)) == 3 for r in many)
    assert all(len({c["name"] for c in _calls(r)}) == 3 for r in many)  # distinct_tools

    typed = generate(n, SyntheticConfig(num_tools=3, arg_types=("string", "integer"), max_calls=2), seed=5)
    for r in typed:
        for t in json.loads(r["tools"]):
            assert BY_NAME[t["name"]].kinds <= {"string", "integer"}

    def family_share(records):
        same = total = 0
        for r in records:
            target_families = {BY_NAME[c["name"]].family for c in _calls(r)}
            targets = {c["name"] for c in _calls(r)}
            for t in json.loads(r["tools"]):
                if t["name"] not in targets:
                    total += 1
                    same += BY_NAME[t["name"]].family in target_families
        return same / total

    similar = family_share(generate(n, SyntheticConfig(num_tools=3, max_calls=1, similar_distractor_prob=1.0), seed=6))
    random_ = family_share(generate(n, SyntheticConfig(num_tools=3, max_calls=1, similar_distractor_prob=0.0), seed=6))
    assert similar > 0.95 and random_ < 0.5

    def optional_count(records):
        return sum(
            BY_NAME[c["name"]].params[[p.name for p in BY_NAME[c["name"]].params].index(a)].optional
            for r in records
            for c in _calls(r)
            for a in c["arguments"]
        )

    assert optional_count(generate(n, SyntheticConfig(optional_prob=0.0), seed=7)) == 0
    always = generate(n, SyntheticConfig(optional_prob=1.0), seed=7)
    for r in always:
        for c in _calls(r):
            assert set(c["arguments"]) == {p.name for p in BY_NAME[c["name"]].params}


def test_held_out_phrasing_uses_only_wordings_the_seen_split_never_does():
    """phrasing="seen" drops each tool's last template, "held_out" keeps only it: the two splits share
    tools and values but no sentence frame (the out-of-distribution evaluation of the demo)."""
    cfg = SyntheticConfig(num_tools=2, max_calls=1, optional_prob=0.0)

    def frames(phrasing):  # the template each query was written from
        out = set()
        for r in generate(400, dataclasses.replace(cfg, phrasing=phrasing), seed=9):
            tool = BY_NAME[_calls(r)[0]["name"]]
            matches = [t for t in tool.templates if all(piece in r["query"] for piece in _literal_pieces(t))]
            assert len(matches) == 1, (r["query"], tool.templates)
            out.add((tool.name, matches[0]))
        return out

    seen, held_out, every = frames("seen"), frames("held_out"), frames("all")
    assert seen and held_out and not seen & held_out and seen | held_out == every
    assert {name for name, _ in held_out} == {name for name, _ in seen}
    assert generate(30, cfg, seed=9) == generate(30, dataclasses.replace(cfg, phrasing="all"), seed=9)
    with pytest.raises(ValueError, match="phrasing"):
        SyntheticConfig(phrasing="unseen")


def _literal_pieces(template):
    """The fixed text of a query template, between its `{field}`s."""
    return [text for text, _, _, _ in string.Formatter().parse(template) if text.strip()]


@pytest.mark.parametrize(
    "field, value", [("max_calls", 0), ("num_tools", 1), ("arg_types", ("string", "date")), ("optional_prob", 1.5)]
)
def test_bad_knobs_fail_naming_the_field(field, value):
    kwargs = {"num_tools": 2, "max_calls": 2, field: value}
    with pytest.raises(ValueError, match=field.split("_")[0]):
        SyntheticConfig(**kwargs)


def test_records_convert_through_xlam_with_zero_drops_and_ground_truth_scores_one():
    rows = generate(400, SyntheticConfig(num_tools=5, max_calls=3), seed=8)
    records, drops = convert_rows(rows, source="synthetic")
    assert sum(drops.values()) == 0 and len(records) == len(rows)
    counts = Counter(len(r.answer) for r in records)
    assert set(counts) == {1, 2, 3}  # single and parallel calls
    for r in records:
        completion = format_completion(r.answer, template_reasoning(r.answer))
        assert tool_call_reward(completion, r.answer, "binary") == 1.0
        assert tool_call_reward(completion, json.dumps(r.answer), "binary") == 1.0
        # And a near miss (one argument value changed) scores 0: the task is exact.
        wrong = json.loads(json.dumps(r.answer))
        key = next(iter(wrong[0]["arguments"]))
        wrong[0]["arguments"][key] = "__wrong__"
        assert tool_call_reward(format_completion(wrong, "x"), r.answer, "binary") == 0.0


def test_template_reasoning_names_the_tools():
    assert template_reasoning([{"name": "a", "arguments": {}}]) == "The user needs a."
    assert (
        template_reasoning([{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}])
        == "The user needs a and b."
    )
    assert template_reasoning([]) == "No tool fits the request."
    assert synthetic.corpus_text(generate(2))  # tokenizer corpus is non-empty text
