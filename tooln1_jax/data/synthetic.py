"""Seeded synthetic tool-calling problems in the xLAM record schema.

Each record is `{"id", "query", "tools", "answers"}` with `tools` and `answers` as JSON
strings, exactly like xLAM function-calling-60k, so it flows through the xLAM converter:

    tools   = [{"name", "description", "parameters": {p: {"type", "description", "default"?}}}]
    answers = [{"name", "arguments": {p: value}}]

A problem picks 1..`max_calls` target calls, writes one templated sentence per call (joined
into one query for parallel calls), and shows `num_tools` tools: the targets plus distractors,
preferring look-alike siblings (`get_weather` next to `get_weather_forecast`). Optional
arguments appear in the answer exactly when the query mentions them, so the exact-match reward
is well defined. The answer is built from the same sampled values as the query, never parsed
back from text.

Difficulty knobs (`SyntheticConfig`): how many tools to choose among, how many calls, which
argument types occur, how often look-alike distractors appear, how often optional arguments
are mentioned.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from typing import Any

from tooln1_jax.data.synthetic_tools import ARG_TYPES, TOOLS, Tool

_BY_NAME = {t.name: t for t in TOOLS}
PHRASINGS = ("all", "seen", "held_out")


def _templates(tool: Tool, phrasing: str) -> tuple[str, ...]:
    """The query templates of `tool` that `phrasing` allows (every tool has at least two)."""
    return {"all": tool.templates, "seen": tool.templates[:-1], "held_out": tool.templates[-1:]}[phrasing]


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Difficulty knobs.

    num_tools:      tools shown per problem (targets + distractors), at least `max_calls`.
    min_calls, max_calls: calls per answer (more than one = a parallel call).
    arg_types:      only tools whose parameters all have these kinds are used.
    similar_distractor_prob: chance that each distractor is a look-alike of a target.
    optional_prob:  chance that each optional parameter is mentioned (and so in the answer).
    distinct_tools: whether the calls of one problem use different tools.
    phrasing:       which query templates of each tool are used: "all"; "seen", all but the
                    last; "held_out", only the last. Training on "seen" and evaluating on
                    "held_out" tests the tools and values under wordings the model never saw.
    """

    num_tools: int = 4
    min_calls: int = 1
    max_calls: int = 2
    arg_types: tuple[str, ...] = ARG_TYPES
    similar_distractor_prob: float = 0.7
    optional_prob: float = 0.4
    distinct_tools: bool = True
    phrasing: str = "all"

    def __post_init__(self):
        if self.phrasing not in PHRASINGS:
            raise ValueError(f"synthetic: phrasing={self.phrasing!r}; expected one of {PHRASINGS}")
        if not 1 <= self.min_calls <= self.max_calls:
            raise ValueError(f"synthetic: need 1 <= min_calls ({self.min_calls}) <= max_calls ({self.max_calls})")
        if self.num_tools < (self.max_calls if self.distinct_tools else 1):
            raise ValueError(f"synthetic: num_tools={self.num_tools} is smaller than max_calls={self.max_calls}")
        unknown = set(self.arg_types) - set(ARG_TYPES)
        if unknown:
            raise ValueError(f"synthetic: arg_types has unknown kinds {sorted(unknown)}; known: {ARG_TYPES}")
        if len(self.tool_pool) < self.num_tools:
            raise ValueError(
                f"synthetic: only {len(self.tool_pool)} tools use arg_types={self.arg_types}, "
                f"fewer than num_tools={self.num_tools}"
            )
        for name in ("similar_distractor_prob", "optional_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"synthetic: {name}={getattr(self, name)} must be in [0, 1]")

    @property
    def tool_pool(self) -> tuple[Tool, ...]:
        return tuple(t for t in TOOLS if t.kinds <= set(self.arg_types))


def _one_call(tool: Tool, rng: random.Random, optional_prob: float, phrasing: str) -> tuple[str, dict]:
    """(sentence, arguments) for one call; both come from the same sampled values."""
    args: dict[str, Any] = {}
    fields: dict[str, str] = {}
    suffix = ""
    for p in tool.params:
        if p.optional and rng.random() >= optional_prob:
            continue
        value = p.sample(rng)
        args[p.name] = value
        if p.optional:
            suffix += p.render(value, rng)
        else:
            fields[p.name] = p.render(value, rng)
    return rng.choice(_templates(tool, phrasing)).format(**fields) + suffix, args


def _join(sentences: list[str], rng: random.Random) -> str:
    if len(sentences) == 1:
        return sentences[0] + rng.choice((".", "?", ", please."))
    out = sentences[0]
    for s in sentences[1:]:
        out += rng.choice((". Also, ", ", and then ", ". After that, ")) + s[0].lower() + s[1:]
    return out + "."


def make_problem(rng: random.Random, config: SyntheticConfig, index: int) -> dict:
    """One xLAM-schema record drawn from `rng`."""
    pool = config.tool_pool
    n_calls = rng.randint(config.min_calls, config.max_calls)
    if config.distinct_tools:
        targets = rng.sample(list(pool), n_calls)
    else:
        targets = [rng.choice(pool) for _ in range(n_calls)]
    shown = list(dict.fromkeys(t.name for t in targets))
    while len(shown) < config.num_tools:
        siblings = [t.name for t in pool if t.family in {_BY_NAME[n].family for n in shown} and t.name not in shown]
        others = [t.name for t in pool if t.name not in shown]
        shown.append(rng.choice(siblings if siblings and rng.random() < config.similar_distractor_prob else others))
    rng.shuffle(shown)
    sentences, answers = [], []
    for tool in targets:
        sentence, args = _one_call(tool, rng, config.optional_prob, config.phrasing)
        sentences.append(sentence)
        answers.append({"name": tool.name, "arguments": args})
    return {
        "id": index,
        "query": _join(sentences, rng),
        "tools": json.dumps([_BY_NAME[n].schema() for n in shown]),
        "answers": json.dumps(answers),
    }


def generate(num: int, config: SyntheticConfig = SyntheticConfig(), seed: int = 0, start_id: int = 0) -> list[dict]:
    """`num` records, a pure function of (config, seed): the same arguments give the same records."""
    rng = random.Random(f"tooln1-synthetic/{seed}")
    return [make_problem(rng, config, start_id + i) for i in range(num)]


def template_reasoning(answer: Sequence[dict]) -> str:
    """A short templated thought for SFT targets: which tools the answer calls, in order."""
    names = [call["name"] for call in answer]
    if not names:
        return "No tool fits the request."
    if len(names) == 1:
        return f"The user needs {names[0]}."
    return "The user needs " + ", ".join(names[:-1]) + " and " + names[-1] + "."


def corpus_text(records: Sequence[dict]) -> list[str]:
    """Every string a tokenizer should cover compactly: queries, tool JSON, answers, thoughts."""
    out = []
    for r in records:
        answer = json.loads(r["answers"])
        out += [r["query"], template_reasoning(answer), json.dumps(answer)]
        out += [json.dumps({"type": "function", "function": t}) for t in json.loads(r["tools"])]
    return out
