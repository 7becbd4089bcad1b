"""Model output is untrusted text: the training reward and the BFCL and API-Bank scorers take
time linear in its length (unclosed `<tool_call>` tags once made them quadratic), never raise,
and find exactly the blocks the lazy regex `<tool_call>(.*?)</tool_call>` finds."""

import json
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tooln1_jax.evaluation import api_bank, bfcl
from tooln1_jax.rewards import VARIANTS, _block, batch_rewards, score_completion, tool_call_reward

TEN_MB = 10 * 1024 * 1024
# Shapes that used to make the scan retry every opener, plus ordinary ones, each ~10 MB.
PATHOLOGICAL = [
    "<tool_call>",
    "<tool_call>{",
    "<tool_call>[",
    "<tool_call></tool_call>",
    "<tool_call>x</tool_",
    "<think><tool_call>",
    "</tool_call><tool_call>",
    '<tool_call>{"name": "f", "arguments": {}}',
]

# One BFCL item of each checker path (Python, Java, JavaScript, multi-call, the two relevance kinds).
BFCL_CATEGORIES = ("simple", "java", "javascript", "parallel_multiple", "irrelevance", "live_relevance")
API_BANK_ITEM = api_bank.ApiBankItem(
    id="t:0",
    apis=[],
    turns=[],
    system="",
    expected_name="f",
    multi_turn=False,
    expected_arguments={"a": "1", "b": "[1, 2]", "c": "{'k': 'v'}"},
)


@pytest.fixture(scope="module")
def bfcl_items():
    loaded, _ = bfcl.load_items(BFCL_CATEGORIES, limit=1)
    return [its[0] for its in loaded.values()]


def _scorers(bfcl_items):
    """(name, fn(text)) for every scorer of model text."""
    out = [(f"reward:{v}", lambda t, v=v: score_completion(t, [], v)) for v in VARIANTS]
    out.append(("reward:first", lambda t: score_completion(t, [], "binary", block="first")))
    out += [(f"bfcl:{it.category}", lambda t, it=it: bfcl.score_item(it, t).to_dict()) for it in bfcl_items]
    out.append(("api_bank", lambda t: api_bank.score_item(API_BANK_ITEM, t).to_dict()))
    return out


def _seconds(fn, text, repeats=1):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(text)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("unit", PATHOLOGICAL)
def test_ten_megabytes_of_tags_score_in_under_a_second(unit, bfcl_items):
    text = unit * (TEN_MB // len(unit))
    for name, fn in _scorers(bfcl_items):
        assert _seconds(fn, text) < 1.0, name


def _per_call(fn, text, budget=0.02):
    """Seconds per call: the best of 5 timings of a loop of calls that lasts about `budget`, so
    a preemption on a busy machine cannot dominate a sub-millisecond call."""
    calls = 1
    while _seconds(lambda t, n=calls: [fn(t) for _ in range(n)], text) < budget:
        calls *= 2
    return _seconds(lambda t: [fn(t) for _ in range(calls)], text, repeats=5) / calls


def test_time_grows_linearly_with_open_tags(bfcl_items):
    """Quadratic scanning makes t(100k)/t(10k) about 100; linear about 10 (call overhead makes it
    less). One call of each size must also stay under a second, so a quadratic scan fails at 10k
    tags (15 s), not hours later."""
    for name, fn in [
        ("reward", lambda t: tool_call_reward(t, [])),
        ("bfcl", lambda t: bfcl.score_item(bfcl_items[0], t)),
        ("api_bank", lambda t: api_bank.score_item(API_BANK_ITEM, t)),
    ]:
        times = {}
        for n in (1_000, 10_000, 100_000):
            assert _seconds(fn, "<tool_call>" * n) < 1.0, (name, n)
            times[n] = _per_call(fn, "<tool_call>" * n)
        assert times[100_000] / times[10_000] < 30, (name, times)


def test_deeply_nested_arguments_do_not_raise(bfcl_items):
    """A call nested as deep as `json` parses (near the recursion limit) is scored and reported."""
    for depth in (500, 900, 990, 5000):
        nested = "[" * depth + "]" * depth
        for it in bfcl_items:
            name = it.functions[0]["name"]
            text = '<tool_call>{"name": "%s", "arguments": {"a": %s}}</tool_call>' % (name, nested)
            json.dumps(bfcl.score_item(it, text).to_dict(), default=str)
        text = '<tool_call>{"name": "f", "arguments": {"a": %s}}</tool_call>' % nested
        result = api_bank.score_item(API_BANK_ITEM, text)
        assert not result.valid
        json.dumps(result.to_dict(), default=str)
        batch_rewards([text], [[{"name": "f", "arguments": {"a": []}}]])


def test_duplicate_keys_fail_evaluation(bfcl_items):
    """A repeated key is malformed JSON for the scorers too (as a repeated keyword is a Python
    syntax error for BFCL's own decoders), not last-wins."""
    good = api_bank.oracle_completion(API_BANK_ITEM)
    assert api_bank.score_item(API_BANK_ITEM, good).valid
    dup = good.replace('{"a": "1"', '{"a": "2", "a": "1"')
    assert dup != good and api_bank.score_item(API_BANK_ITEM, dup).error_type == "no_valid_tool_call"
    item = bfcl_items[0]
    good = bfcl.oracle_completion(item)
    assert bfcl.score_item(item, good).valid
    key = next(iter(json.loads(good.split("<tool_call>")[1].split("</tool_call>")[0])[0]["arguments"]))
    dup = good.replace('"arguments": {', '"arguments": {"%s": null, ' % key, 1)
    assert bfcl.score_item(item, dup).error_type == "ast_decoder:decoder_failed"


# ---------------------------------------------------------------- fuzzing

_REGEX = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_call", "tool_call>", "</"]
JSON_BITS = [
    "{",
    "}",
    "[",
    "]",
    '"name"',
    '"arguments"',
    ":",
    ",",
    '"',
    "\\",
    "0",
    "-1",
    "3.5",
    "1e999",
    "true",
    "null",
    "NaN",
    '"f"',
    '"a"',
    '"1"',
    '"[1, 2]"',
    '"calculate_triangle_area"',
    '"base"',
    "10",
    " ",
    "\n",
]
fragment = st.one_of(
    st.sampled_from(TAGS + JSON_BITS), st.text(max_size=6), st.binary(max_size=6).map(lambda b: b.decode("latin-1"))
)
# A fragment repeated up to 3000 times, so some examples are long runs of one tag or bracket.
piece = st.one_of(fragment, st.tuples(fragment, st.integers(1, 3000)).map(lambda fr: fr[0] * fr[1]))
completions = st.lists(piece, max_size=15).map("".join)


@pytest.mark.parametrize(
    "text, first, last",
    [
        ("<tool_call>a</tool_call></tool_call><tool_call>b</tool_call>", "a", "b"),  # a stray closer between
        ("<tool_call>a<tool_call>b</tool_call>", "a<tool_call>b", "a<tool_call>b"),  # the first opener starts it
        ("<tool_call>a</tool_call><tool_call>b", "a", "a"),  # an unclosed last block is no block
        ("</tool_call><tool_call>a</tool_call>", "a", "a"),
        ("<tool_call>a</tool_call>x<tool_call>b<tool_call>c</tool_call></tool_call>", "a", "b<tool_call>c"),
        ("<tool_call></tool_call>", "", ""),
        ("</tool_call><tool_call>", None, None),
        ("<tool_call></tool_call" + "<tool_call>" * 3, None, None),
    ],
)
def test_block_is_the_regex_match(text, first, last):
    bodies = _REGEX.findall(text)
    assert (bodies[0] if bodies else None, bodies[-1] if bodies else None) == (first, last)
    assert (_block(text, "first"), _block(text, "last")) == (first, last)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(completions)
def test_fuzz_scorers_never_raise_and_stay_fast(bfcl_items, text):
    if text.count("<tool_call>") < 300:  # the regex itself is quadratic in unclosed openers
        bodies = _REGEX.findall(text)
        assert _block(text, "first") == (bodies[0] if bodies else None)
        assert _block(text, "last") == (bodies[-1] if bodies else None)
    for name, fn in _scorers(bfcl_items):  # best of 2: a slow scorer is slow twice, a stall of the machine is not
        assert _seconds(fn, text, repeats=2) < 1.0, name
