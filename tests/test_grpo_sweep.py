"""`benchmarks/grpo_sweep.py --coverage`'s per-argument count: what the warm-start coverage table
in docs/experiments reads (the right value in a sampled call, by JSON type)."""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.grpo_sweep import argument_hits  # noqa: E402
from tooln1_jax.data.records import ToolRecord  # noqa: E402


def _record(arguments: dict) -> ToolRecord:
    return ToolRecord(
        source="synthetic",
        id="0",
        system="",
        tools=[],
        conversations=[{"role": "user", "content": "q"}],
        answer=[{"name": "set_timer", "arguments": arguments}],
    )


def _completion(name: str, arguments: dict | str) -> str:
    body = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return f'<think>t</think>\n<tool_call>\n[{{"name": "{name}", "arguments": {body}}}]\n</tool_call>'


def test_argument_hits_counts_values_by_type_as_the_reward_compares_them():
    records = [_record({"minutes": 5, "label": "tea", "loud": True}), _record({"minutes": 7})]
    completions = [
        _completion("set_timer", {"minutes": 5, "label": "tea", "loud": True}),  # all three right
        _completion("set_timer", {"minutes": 5.0, "label": "Tea", "loud": 1}),  # 5.0, case, 1: none right
        _completion("set_alarm", {"minutes": 5, "label": "tea", "loud": True}),  # wrong tool: none right
        "<think>t</think> no call",  # no call block: none right
        _completion("set_timer", {"minutes": 7}),
        _completion("set_timer", {"label": "tea"}),  # the argument is missing
        _completion("set_timer", "[1, 2]"),  # arguments not an object
        _completion("set_timer", {"minutes": 8}),
    ]
    hits = argument_hits(records, completions, num_samples=4)
    assert hits == {
        "int": [True, False, False, False, True, False, False, False],
        "str": [True, False, False, False],
        "bool": [True, False, False, False],
    }
