"""The Tool-N1 reward, rule by rule (PAPER_NOTES "Reward semantics"), for every variant, plus
hypothesis fuzzing that it never raises and stays in each variant's value set."""

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tooln1_jax.data.prompt import format_completion
from tooln1_jax.rewards import (
    REASONS,
    VARIANT_VALUES,
    VARIANTS,
    batch_rewards,
    parse_tool_calls,
    reasoning_stats,
    reasoning_text,
    score_completion,
    tool_call_reward,
)

GT = [
    {"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "opts": {"unit": "C", "hourly": False}}},
    {"name": "convert", "arguments": {"amount": 1.5, "tags": ["a", "b"]}},
]
THINK = "<think>Two calls are needed.</think>\n"


def block(payload) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"<tool_call>\n{text}\n</tool_call>"


def calls(*edits):
    """A deep copy of GT with (index, key, value) edits to the arguments."""
    out = json.loads(json.dumps(GT))
    for index, key, value in edits:
        out[index]["arguments"][key] = value
    return out


# Expected (reward, reason) for each variant, by outcome kind and presence of both think tags.
def expect(kind: str, think: bool) -> dict:
    if kind == "correct":
        if think:
            return {v: (1.0, "correct") for v in VARIANTS}
        return {
            "binary": (0.0, "missing_think"),
            "no_reason": (1.0, "correct"),
            "partial_reason": (0.8, "missing_think"),
            "partial_reason_funcname": (0.8, "missing_think"),
        }
    tag = 0.2 if think else 0.0
    name_bonus = 0.2 if kind == "wrong_arguments" else 0.0
    return {
        "binary": (0.0, kind),
        "no_reason": (0.0, kind),
        "partial_reason": (tag, kind),
        "partial_reason_funcname": (round(tag + name_bonus, 1), kind),
    }


# (rule, completion, ground truth, outcome kind, think tags present)
CASES = [
    # 1. the LAST <tool_call> block is scored; dot matches newline; the body is stripped
    ("last_block_scored", THINK + block(calls((0, "days", 9))) + block(GT), GT, "correct", True),
    ("last_block_wrong_first_right", THINK + block(GT) + block(calls((0, "days", 9))), GT, "wrong_arguments", True),
    (
        "multiline_body_stripped",
        THINK + "<tool_call>\n\n  " + json.dumps(GT, indent=2) + "\n\t </tool_call>",
        GT,
        "correct",
        True,
    ),
    ("no_block", THINK + "I would call get_weather for Paris.", GT, "no_call_block", True),
    ("no_block_no_think", json.dumps(GT), GT, "no_call_block", False),
    ("unclosed_block", THINK + "<tool_call>" + json.dumps(GT), GT, "no_call_block", True),
    ("invalid_json", THINK + block('[{"name": "get_weather", "arguments": {'), GT, "bad_json", True),
    ("invalid_json_no_think", block("[{'name': 'get_weather'}]"), GT, "bad_json", False),
    # 2. a JSON string payload is decoded once more; a dict becomes a one-element list
    ("string_payload_decoded", THINK + block(json.dumps(json.dumps(GT))), GT, "correct", True),
    ("string_payload_invalid", THINK + block('"not json at all"'), GT, "bad_json", True),
    ("dict_payload_wrapped", THINK + block(GT[0]), GT[:1], "correct", True),
    ("dict_payload_wrapped_wrong", THINK + block(GT[0]), GT, "wrong_name", True),
    # 4. format: both <think> and </think> somewhere; order and position not checked
    ("think_reversed_order", "</think> whatever <think>\n" + block(GT), GT, "correct", True),
    ("think_after_call", block(GT) + "\n<think>late</think>", GT, "correct", True),
    ("think_missing", block(GT), GT, "correct", False),
    ("only_open_think", "<think>no close\n" + block(GT), GT, "correct", False),
    ("only_close_think", "no open</think>\n" + block(GT), GT, "correct", False),
    ("think_missing_wrong_args", block(calls((1, "amount", 2))), GT, "wrong_arguments", False),
    # 5. items must be dicts with name and arguments; non-list payloads are a bad format
    ("item_not_dict", THINK + block([["get_weather", {"city": "Paris"}]]), GT, "bad_item_format", True),
    ("item_missing_arguments", THINK + block([{"name": "get_weather"}]), GT, "bad_item_format", True),
    (
        "item_parameters_not_arguments",
        THINK + block([{"name": "get_weather", "parameters": {}}]),
        GT,
        "bad_item_format",
        True,
    ),
    ("one_bad_item_among_good", THINK + block(GT + [5]), GT, "bad_item_format", True),
    ("bare_number_payload", THINK + block("5"), GT, "bad_item_format", True),
    ("bare_bool_payload", THINK + block("true"), GT, "bad_item_format", True),
    ("null_payload", THINK + block("null"), GT, "bad_item_format", True),
    ("string_number_payload", THINK + block('"5"'), GT, "bad_item_format", True),
    ("bare_number_no_think", block("5"), GT, "bad_item_format", False),
    # 6. multiset of (name, json.dumps(arguments, sort_keys=True))
    ("call_order_free", THINK + block(GT[::-1]), GT, "correct", True),
    (
        "key_order_free_at_depth",
        THINK
        + block(
            [
                {
                    "arguments": {"opts": {"hourly": False, "unit": "C"}, "days": 3, "city": "Paris"},
                    "name": "get_weather",
                },
                GT[1],
            ]
        ),
        GT,
        "correct",
        True,
    ),
    ("list_order_matters", THINK + block(calls((1, "tags", ["b", "a"]))), GT, "wrong_arguments", True),
    ("string_vs_int", THINK + block(calls((0, "days", "3"))), GT, "wrong_arguments", True),
    ("float_vs_int", THINK + block(calls((0, "days", 3.0))), GT, "wrong_arguments", True),
    (
        "bool_vs_int",
        THINK + block([{"name": "get_weather", "arguments": {"days": True}}]),
        [{"name": "get_weather", "arguments": {"days": 1}}],
        "wrong_arguments",
        True,
    ),
    ("extra_optional_argument", THINK + block(calls((0, "lang", "en"))), GT, "wrong_arguments", True),
    (
        "missing_argument",
        THINK + block([{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, GT[1]]),
        GT,
        "wrong_arguments",
        True,
    ),
    (
        "nested_value_differs",
        THINK + block(calls((0, "opts", {"unit": "F", "hourly": False}))),
        GT,
        "wrong_arguments",
        True,
    ),
    ("wrong_name", THINK + block([GT[0], dict(GT[1], name="convert_currency")]), GT, "wrong_name", True),
    ("missing_call", THINK + block(GT[:1]), GT, "wrong_name", True),
    ("duplicate_call_is_a_multiset", THINK + block(GT + GT[:1]), GT, "wrong_name", True),
    ("duplicates_counted", THINK + block([GT[0], GT[0]]), [GT[0], GT[0]], "correct", True),
    (
        "same_names_args_swapped_between_calls",
        THINK + block([{"name": "f", "arguments": {"x": 2}}, {"name": "f", "arguments": {"x": 1}}]),
        [{"name": "f", "arguments": {"x": 1}}, {"name": "f", "arguments": {"x": 1}}],
        "wrong_arguments",
        True,
    ),
    ("extra_item_keys_ignored", THINK + block([dict(GT[0], id="c1"), GT[1]]), GT, "correct", True),
    # empty lists: correct only when both are empty
    ("empty_both", THINK + block([]), [], "correct", True),
    ("empty_both_no_think", block([]), [], "correct", False),
    ("empty_prediction", THINK + block([]), GT, "wrong_name", True),
    ("empty_truth_nonempty_prediction", THINK + block(GT), [], "wrong_name", True),
    ("plain_text_vs_empty_truth", THINK + "No function fits this request.", [], "no_call_block", True),
    # the ground truth may be the JSON string of the list (or of one dict)
    ("truth_as_json_string", THINK + block(GT), json.dumps(GT), "correct", True),
    ("truth_as_dict_string", THINK + block(GT[:1]), json.dumps(GT[0]), "correct", True),
    ("truth_string_wrong_args", THINK + block(calls((0, "city", "Lyon"))), json.dumps(GT), "wrong_arguments", True),
    # a JSON object with a repeated key is malformed (not last-wins), at any depth
    (
        "duplicate_argument_key",
        THINK + block('[{"name": "f", "arguments": {"a": 2, "a": 1}}]'),
        [{"name": "f", "arguments": {"a": 1}}],
        "bad_json",
        True,
    ),
    (
        "duplicate_name_key",
        THINK + block('{"name": "g", "name": "f", "arguments": {"a": 1}}'),
        [{"name": "f", "arguments": {"a": 1}}],
        "bad_json",
        True,
    ),
    (
        "duplicate_key_nested",
        THINK + block('[{"name": "f", "arguments": {"a": [{"b": 1, "b": 1}]}}]'),
        [{"name": "f", "arguments": {"a": [{"b": 1}]}}],
        "bad_json",
        True,
    ),
    (
        "duplicate_key_in_string_payload",
        THINK + block(json.dumps('{"name": "f", "arguments": {"a": 1, "a": 1}}')),
        [{"name": "f", "arguments": {"a": 1}}],
        "bad_json",
        True,
    ),
    (
        "same_key_in_sibling_objects",
        THINK + block('[{"name": "f", "arguments": {"a": 1}}, {"name": "f", "arguments": {"a": 1}}]'),
        [{"name": "f", "arguments": {"a": 1}}] * 2,
        "correct",
        True,
    ),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rule, completion, truth, kind, think", CASES, ids=[c[0] for c in CASES])
def test_reward_rule(rule, completion, truth, kind, think, variant):
    reward, reason = score_completion(completion, truth, variant)
    assert (reward, reason) == expect(kind, think)[variant], rule
    assert reward in VARIANT_VALUES[variant]
    assert tool_call_reward(completion, truth, variant) == reward


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "truth",
    [
        "not json",
        "{'name': 'f'}",
        "5",
        "[1, 2]",
        '[{"name": "f"}]',
        None,
        7,
        [{"name": "f", "arguments": {1: "a", "b": 2}}],
        [{"name": "f", "arguments": {1}}],
    ],
)
def test_bad_ground_truth_scores_zero(truth, variant):
    """A ground truth that is not a call list (the original code crashes) gives 0, not an error."""
    completion = THINK + block([{"name": "f", "arguments": {}}])
    assert score_completion(completion, truth, variant) == (0.0, "bad_ground_truth")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("completion", [None, 5, b"<tool_call>[]</tool_call>", ""])
def test_non_string_or_empty_completion(completion, variant):
    assert score_completion(completion, GT, variant) == (0.0, "no_call_block")


def test_first_block_for_evaluation():
    text = THINK + block(GT) + block(calls((0, "days", 9)))
    assert parse_tool_calls(text, block="first") == GT
    assert parse_tool_calls(text, block="last") == calls((0, "days", 9))
    assert score_completion(text, GT, "binary", block="first") == (1.0, "correct")
    assert score_completion(text, GT, "binary") == (0.0, "wrong_arguments")
    with pytest.raises(ValueError, match="block"):
        parse_tool_calls(text, block="middle")


def test_nested_tool_call_tags_follow_the_regex():
    """A stray opening tag inside: the non-greedy regex's last match starts at the FIRST opener,
    so the body is not JSON (as in the original implementation)."""
    text = THINK + "<tool_call>oops<tool_call>" + json.dumps(GT) + "</tool_call>"
    assert score_completion(text, GT) == (0.0, "bad_json")


def test_parse_tool_calls_failures_are_none():
    for text in ["no block", block("{bad"), block("5"), block([{"name": "f"}]), block('"[1"')]:
        assert parse_tool_calls(text) is None
    assert parse_tool_calls(block(GT[0])) == [GT[0]]
    assert parse_tool_calls(block(json.dumps(json.dumps(GT)))) == GT


def test_deeply_nested_payload_does_not_raise():
    deep = "[" * 100_000 + "]" * 100_000
    for variant in VARIANTS:
        assert score_completion(THINK + block(deep), GT, variant)[1] in ("bad_json", "bad_item_format")
    huge_int = "[" + "9" * 5000 + "]"  # over Python's int-string digit limit
    assert score_completion(THINK + block(huge_int), GT) == (0.0, "bad_json")


def test_duplicate_keys_in_a_ground_truth_string_are_a_bad_label():
    truth = '[{"name": "f", "arguments": {"a": 2, "a": 1}}]'
    assert score_completion(THINK + block([{"name": "f", "arguments": {"a": 1}}]), truth) == (0.0, "bad_ground_truth")
    assert parse_tool_calls(block(truth)) is None


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown reward variant"):
        tool_call_reward(THINK + block(GT), GT, variant="partial")


def test_batch_rewards_matches_single():
    completions = [THINK + block(GT), block(GT), THINK + block(calls((0, "days", 4))), "text", THINK + block("5")]
    truths = [GT, json.dumps(GT), GT, GT, "not json"]
    for variant in VARIANTS:
        rewards, reasons = batch_rewards(completions, truths, variant)
        assert rewards.dtype == np.float32 and rewards.shape == (5,)
        expected = [score_completion(c, t, variant) for c, t in zip(completions, truths)]
        np.testing.assert_array_equal(rewards, np.array([r for r, _ in expected], np.float32))
        assert reasons == [r for _, r in expected]
    with pytest.raises(ValueError, match="ground truths"):
        batch_rewards(completions, truths[:2])


def test_batch_rewards_group_shares_one_truth_object():
    """GRPO groups repeat one ground-truth object; the per-object cache must not mix groups."""
    other = [{"name": "convert", "arguments": {"amount": 2}}]
    completions = [THINK + block(GT)] * 3 + [THINK + block(other)] * 3
    truths = [GT] * 3 + [other] * 3
    rewards, _ = batch_rewards(completions, truths)
    np.testing.assert_array_equal(rewards, np.ones(6, np.float32))


def test_batch_rewards_with_fresh_truth_objects():
    """A lazy sequence returns a new object per item, so freed ids get reused; the cache must not
    confuse them (each item here holds a different truth)."""

    class Lazy:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            if i >= self.n:
                raise IndexError(i)
            return [{"name": "f", "arguments": {"i": i}}]

    n = 50
    completions = [THINK + block([{"name": "f", "arguments": {"i": i}}]) for i in range(n)]
    rewards, _ = batch_rewards(completions, Lazy(n))
    np.testing.assert_array_equal(rewards, np.ones(n, np.float32))


def test_oracle_completion_scores_one():
    text = format_completion(GT, "reasoning")
    assert text.startswith("<think>reasoning</think>\n<tool_call>\n") and text.endswith("\n</tool_call>")
    for variant in VARIANTS:
        assert tool_call_reward(text, GT, variant) == 1.0


# ---------------------------------------------------------------- property-based fuzzing

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)
call_lists = st.lists(
    st.fixed_dictionaries(
        {
            "name": st.sampled_from(["get_weather", "convert", "Get Weather", "f"]),
            "arguments": st.dictionaries(st.text(max_size=6), json_values, max_size=4),
        }
    ),
    max_size=3,
)

FRAGMENTS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "[",
    "]",
    "{",
    "}",
    '"',
    ",",
    ":",
    "5",
    "true",
    "null",
    '"name"',
    '"arguments"',
    "\\",
    "\n",
    " ",
    "nan",
    "Infinity",
    '"\\"[1]\\""',
    "x",
]


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 2 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randint(-5, 5)
    if kind == 2:
        return rng.choice([0.0, -1.5, 1e300, 2.5])
    if kind in (3, 4):
        return rng.choice(["", "a", "Paris", "1", "\u00e9", '"q"'])
    if kind in (5, 6):
        return {rng.choice("abcxyz"): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]


def _random_calls(rng: random.Random) -> list:
    return [
        {
            "name": rng.choice(["get_weather", "convert", "Get Weather", "f"]),
            "arguments": {rng.choice("abcd"): _random_json(rng) for _ in range(rng.randrange(4))},
        }
        for _ in range(rng.randrange(4))
    ]


# A fixed pool of ground truths (cheap to draw, so 10,000 examples stay fast): call lists, their
# JSON strings, and labels that are not call lists at all.
_pool_rng = random.Random(0)
CALL_POOL = [GT, [], [GT[0], GT[0]]] + [_random_calls(_pool_rng) for _ in range(40)]
TRUTH_POOL = (
    CALL_POOL
    + [json.dumps(c) for c in CALL_POOL[:20]]
    + ["not json", "5", "{}", '{"name": "f", "arguments": {}}', '"[]"', None, 3, [1, 2], [{"name": "f"}]]
)


def _mutate(text: str, rng: random.Random) -> str:
    for _ in range(rng.randrange(5)):
        i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
        op = rng.randrange(4)
        if op == 0:
            text = text[:i] + text[j:]  # delete a span
        elif op == 1:
            text = text[:i] + rng.choice(FRAGMENTS) + text[i:]  # insert a fragment
        elif op == 2:
            text = text[:i] + text[i:j] * 2 + text[j:]  # duplicate a span
        else:
            text = text[:i] + text[i:j][::-1] + text[j:]  # reverse a span
    return text


def _mutated_output(args):
    """A valid completion for a pool ground truth after 0-4 random edits, with that truth."""
    index, seed = args
    rng = random.Random(seed)
    truth = CALL_POOL[index]
    text = _mutate(format_completion(truth, rng.choice(["", "plan", "<think>"])), rng)
    return text, (json.dumps(truth) if seed % 2 else truth)


random_text = st.one_of(st.text(max_size=40), st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join))
mutated_outputs = st.tuples(st.integers(0, len(CALL_POOL) - 1), st.integers(0, 2**32 - 1)).map(_mutated_output)
fuzz_inputs = st.one_of(st.tuples(random_text, st.sampled_from(TRUTH_POOL)), mutated_outputs)


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(fuzz_inputs)
def test_fuzz_reward_never_raises_and_stays_in_range(example):
    completion, truth = example
    for variant in VARIANTS:
        reward, reason = score_completion(completion, truth, variant)
        assert reward in VARIANT_VALUES[variant], (variant, reward)
        assert reason in REASONS
        assert (reason == "correct") == (reward == 1.0)
        parse_tool_calls(completion, block="first")


@settings(max_examples=200, deadline=None)
@given(call_lists, st.randoms())
def test_property_valid_output_scores_one_in_any_call_order(truth, rng):
    shuffled = list(truth)
    rng.shuffle(shuffled)
    text = format_completion(shuffled, "ok")
    for variant in VARIANTS:
        assert score_completion(text, truth, variant) == (1.0, "correct")


def test_reasoning_stats_count_non_empty_think_blocks():
    completions = [
        "<think>pick get_weather</think><tool_call>[]</tool_call>",  # 16 characters of reasoning
        "<think>  </think><tool_call>[]</tool_call>",  # an empty block does not count as reasoning
        "</think>late<think>",  # a close before any open: no block
        "no tags at all",
        "<think>abc",  # never closed
    ]
    assert [reasoning_text(c) for c in completions] == ["pick get_weather", "", "", "", ""]
    assert reasoning_stats(completions) == {"think_frac": 0.2, "think_chars": 16.0}
    assert reasoning_stats([]) == {"think_frac": 0.0, "think_chars": 0.0}
    # Linear in the input: a megabyte of unclosed openers is one scan.
    assert reasoning_text("<think>" * 150_000) == ""
