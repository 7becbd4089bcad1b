"""Tool-call parsing and the rule-based Tool-N1 reward.

The reward reads the completion text only. The rules (see PAPER_NOTES, "Reward semantics"):
1. take the LAST `<tool_call>...</tool_call>` block (evaluation takes the FIRST), strip, `json.loads`
   (an object with a repeated key is invalid JSON here, in a completion and in a ground truth);
2. a decoded string is decoded once more; a dict becomes a one-element list;
3. no block / bad JSON -> no result;
4. format: the substrings `<think>` and `</think>` both occur somewhere (order not checked);
5. every item must be a dict with `name` and `arguments`; a non-list result is a bad format;
6. correct <=> multiset of (name, json.dumps(arguments, sort_keys=True)) is equal on both sides
   (call order and key order free, list order and value types strict; [] matches only []).

Variants: `binary` (format and correct -> 1), `no_reason` (correct -> 1), `partial_reason`
(0.2 for the think tags + 0.8 if correct), `partial_reason_funcname` (0.2 for the tags + 0.8 if
correct, else + 0.2 if the multiset of names alone matches). A missing result or a bad item
format earns only the think-tag credit. Nothing here raises, whatever the input.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from tooln1_jax.settings import REWARD_VARIANTS

VARIANTS = REWARD_VARIANTS
# Every value each variant can return (what the fuzz tests check against).
VARIANT_VALUES = {
    "binary": (0.0, 1.0),
    "no_reason": (0.0, 1.0),
    "partial_reason": (0.0, 0.2, 0.8, 1.0),
    "partial_reason_funcname": (0.0, 0.2, 0.4, 0.8, 1.0),
}
# Per-sample outcome, for metrics. `correct` means the variant's full reward; otherwise the call's
# own failure is named first (parse, items, name, arguments), and `missing_think` is the reason
# only when the call itself is right. `bad_ground_truth` flags a label that is not a call list.
REASONS = (
    "correct",
    "no_call_block",
    "bad_json",
    "bad_item_format",
    "missing_think",
    "wrong_name",
    "wrong_arguments",
    "bad_ground_truth",
)

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_THINK_CREDIT = 0.2
_CALL_CREDIT = 0.8
_NAME_CREDIT = 0.2


def has_think_tags(completion: str) -> bool:
    """Both `<think>` and `</think>` occur somewhere; position and order are not checked."""
    return "<think>" in completion and "</think>" in completion


def reasoning_text(completion: str) -> str:
    """The stripped text between the first `<think>` and the first `</think>` after it ("" when
    there is none): what the reasoning statistics measure. Linear in the completion."""
    start = completion.find("<think>")
    end = completion.find("</think>", start + len("<think>")) if start >= 0 else -1
    return completion[start + len("<think>") : end].strip() if end >= 0 else ""


def reasoning_stats(completions: Sequence[str]) -> dict[str, float]:
    """think_frac: the fraction of completions that reason (a non-empty `<think>` block);
    think_chars: the mean length in characters of that reasoning, over those that do (0 if none)."""
    lengths = [len(reasoning_text(c)) for c in completions]
    reasoned = [n for n in lengths if n]
    return {
        "think_frac": len(reasoned) / max(len(lengths), 1),
        "think_chars": float(np.mean(reasoned)) if reasoned else 0.0,
    }


def _unique_keys(pairs: list) -> dict:
    """`object_pairs_hook` that raises on a repeated key: last-wins would let `{"a": 2, "a": 1}`
    pass for `{"a": 1}`."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return obj


def loads_strict(text: str) -> Any:
    """`json.loads`, except that an object with a repeated key is invalid JSON (ValueError)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def _block(text: str, block: str) -> str | None:
    """The body of the first or last match of the lazy regex `<tool_call>(.*?)</tool_call>`
    (DOTALL), or None. A few str.find/rfind calls, linear in len(text), whatever the model wrote."""
    if block == "first":
        start = text.find(_OPEN)
        end = text.find(_CLOSE, start + len(_OPEN)) if start >= 0 else -1
    else:
        # With P the last opener before the last closer, the last match ends at the first closer
        # after P, and starts at the first opener after the last closer before P (a match holds
        # no closer, so that closer ended the previous match or was a stray one).
        last_close = text.rfind(_CLOSE)
        opener = text.rfind(_OPEN, 0, last_close) if last_close >= 0 else -1
        if opener < 0:
            return None
        end = text.find(_CLOSE, opener + len(_OPEN))
        previous = text.rfind(_CLOSE, 0, opener)
        start = text.find(_OPEN, previous + len(_CLOSE) if previous >= 0 else 0)
    return text[start + len(_OPEN) : end] if start >= 0 and end >= 0 else None


def _decode(payload: Any) -> tuple[str, Any]:
    """Steps 2 and 5 on an already-decoded JSON value -> (status, list of calls)."""
    if isinstance(payload, str):
        try:
            payload = loads_strict(payload)
        except Exception:  # ValueError, RecursionError on deep nesting, huge ints
            return "bad_json", None
    if isinstance(payload, dict):
        payload = [payload]
    if not isinstance(payload, list):
        return "bad_item_format", None
    for item in payload:
        if not (isinstance(item, dict) and "name" in item and "arguments" in item):
            return "bad_item_format", None
    return "ok", payload


def _extract(text: str, block: str) -> tuple[str, Any]:
    """Steps 1-2 and 5 -> (status, calls). status: ok | no_call_block | bad_json | bad_item_format."""
    if block not in ("last", "first"):
        raise ValueError(f"block must be 'last' or 'first', got {block!r}")
    if not isinstance(text, str):
        return "no_call_block", None
    body = _block(text, block)
    if body is None:
        return "no_call_block", None
    try:
        payload = loads_strict(body.strip())
    except Exception:
        return "bad_json", None
    return _decode(payload)


def parse_tool_calls(text: str, block: str = "last") -> list[dict] | None:
    """The calls in the `block` ("last": training, "first": evaluation) `<tool_call>` block of
    `text`, as a list of `{"name", "arguments", ...}` dicts; None when there is no block, the JSON
    is invalid, or an item is not a dict with `name` and `arguments`."""
    status, calls = _extract(text, block)
    return calls if status == "ok" else None


def canonical_json(value: Any) -> str:
    """The form in which the reward compares values: `1`, `1.0` and `true` all differ, and key
    order does not matter."""
    return json.dumps(value, sort_keys=True)


def _call_key(call: dict) -> tuple[str, str]:
    # canonical on the name too, so an unhashable (list) name cannot crash the Counter.
    return canonical_json(call["name"]), canonical_json(call["arguments"])


def _normalise_ground_truth(ground_truth: Any) -> list[dict] | None:
    """A list of calls, a dict, or the JSON string of either -> list of calls (None if invalid)."""
    if isinstance(ground_truth, str):
        try:
            ground_truth = loads_strict(ground_truth)
        except Exception:
            return None
    if isinstance(ground_truth, tuple):
        ground_truth = list(ground_truth)
    status, calls = _decode(ground_truth)
    return calls if status == "ok" else None


def _score(
    completion: Any, truth_keys: Counter | None, truth_names: Counter | None, variant: str, block: str
) -> tuple[float, str]:
    if variant not in VARIANT_VALUES:
        raise ValueError(f"unknown reward variant {variant!r}; expected one of {VARIANTS}")
    if truth_keys is None:
        return 0.0, "bad_ground_truth"
    if not isinstance(completion, str):
        completion = ""
    think = has_think_tags(completion)
    think_credit = _THINK_CREDIT if (think and variant.startswith("partial")) else 0.0
    status, calls = _extract(completion, block)
    if status != "ok":
        return think_credit, status
    try:
        keys = Counter(_call_key(c) for c in calls)
    except Exception:  # unserialisable arguments cannot come from JSON, but stay total anyway
        return think_credit, "bad_item_format"
    if keys == truth_keys:
        if variant == "binary" and not think:
            return 0.0, "missing_think"
        if variant == "no_reason":
            return 1.0, "correct"
        reward = 1.0 if variant == "binary" else think_credit + _CALL_CREDIT
        return reward, ("correct" if think else "missing_think")
    names = Counter(name for name, _ in keys.elements())
    if names == truth_names:
        if variant == "partial_reason_funcname":
            return think_credit + _NAME_CREDIT, "wrong_arguments"
        return think_credit, "wrong_arguments"
    return think_credit, "wrong_name"


def _truth_counters(ground_truth: Any) -> tuple[Counter | None, Counter | None]:
    calls = _normalise_ground_truth(ground_truth)
    if calls is None:
        return None, None
    try:
        keys = Counter(_call_key(c) for c in calls)
    except Exception:  # e.g. mixed int/str dict keys or a non-JSON value in a Python ground truth
        return None, None
    return keys, Counter(name for name, _ in keys.elements())


def score_completion(
    completion: str, ground_truth: Any, variant: str = "binary", block: str = "last"
) -> tuple[float, str]:
    """(reward, reason) for one completion; reason is one of `REASONS`.
    `ground_truth`: list of `{"name", "arguments"}` or its JSON string. Raises only on a bad
    `variant` / `block` argument (a caller bug), never because of the texts."""
    keys, names = _truth_counters(ground_truth)
    return _score(completion, keys, names, variant, block)


def tool_call_reward(completion: str, ground_truth: Any, variant: str = "binary") -> float:
    """The Tool-N1 reward of one completion (scores the LAST `<tool_call>` block)."""
    return score_completion(completion, ground_truth, variant)[0]


def batch_rewards(
    completions: Sequence[str], ground_truths: Sequence[Any], variant: str = "binary", block: str = "last"
) -> tuple[np.ndarray, list[str]]:
    """Rewards for a batch -> (float32 [N], N reasons). Ground truths repeated across a GRPO group
    (the same object or string) are normalised once."""
    if len(completions) != len(ground_truths):
        raise ValueError(f"{len(completions)} completions but {len(ground_truths)} ground truths")
    rewards = np.zeros(len(completions), dtype=np.float32)
    reasons: list[str] = []
    # Keyed by the string, or by object id with the object kept alive in the value: a lazily
    # materialised sequence could otherwise free a truth and hand its id to a different one.
    cache: dict[Any, tuple[Any, Counter | None, Counter | None]] = {}
    for i, (completion, truth) in enumerate(zip(completions, ground_truths)):
        cache_key = truth if isinstance(truth, str) else id(truth)
        if cache_key not in cache:
            cache[cache_key] = (truth, *_truth_counters(truth))
        reward, reason = _score(completion, *cache[cache_key][1:], variant, block)
        rewards[i] = reward
        reasons.append(reason)
    return rewards, reasons
