"""The Tool-N1 prompt: one system message (dataset system text, the tools between `<tools>` and
`</tools>` one JSON object per line, the answer format, a worked two-call example), then the
earlier dialogue turns as their own messages, rendered with the tokenizer's own chat template
plus the generation prompt. Tools are written into the system text, never passed as `tools=`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tooln1_jax.data.records import DropCounts, ToolRecord, tool_call_block

_FORMAT_INSTRUCTIONS = """\
Answer in this format. First think the request through inside <think></think>. Then write all the \
function calls you decide to make as ONE JSON list, each item being {"name": <function name>, \
"arguments": <object of argument values>}, inside a single <tool_call></tool_call> block. Use \
only the functions listed above, with their exact names and argument names."""

_EXAMPLE = """\
Example of an answer with two calls:
<think>The user wants the forecast for two cities; get_forecast takes one city, so I call it once \
for each.</think>
<tool_call>
[{"name": "get_forecast", "arguments": {"city": "Lisbon", "days": 3}}, \
{"name": "get_forecast", "arguments": {"city": "Oslo", "days": 3}}]
</tool_call>"""

_NO_FIT = "If none of the functions fits the request, answer <tool_call>[]</tool_call>."


def tools_block(tools: Sequence[dict]) -> str:
    """`<tools>` + one `{"type": "function", "function": <tool>}` JSON line per tool + `</tools>`."""
    lines = [json.dumps({"type": "function", "function": tool}, ensure_ascii=False) for tool in tools]
    return "<tools>\n" + "\n".join(lines) + "\n</tools>"


def system_message(record: ToolRecord, *, for_eval: bool = False) -> str:
    parts = []
    if record.system.strip():
        parts.append(record.system.strip())
    parts.append(
        "You can call the following functions to help with the user's request. "
        "Each line of the list below describes one function:"
    )
    parts.append(tools_block(record.tools))
    parts.append(_FORMAT_INSTRUCTIONS + (" " + _NO_FIT if for_eval else ""))
    parts.append(_EXAMPLE)
    return "\n\n".join(parts)


def build_messages(record: ToolRecord, *, for_eval: bool = False) -> list[dict]:
    """[system, *earlier turns] as chat messages (`{"role", "content"}`); the record's turns keep
    their roles (user / assistant / tool). `for_eval` adds the `<tool_call>[]</tool_call>` rule."""
    messages = [{"role": "system", "content": system_message(record, for_eval=for_eval)}]
    for turn in record.conversations:
        messages.append({"role": turn["role"], "content": turn["content"]})
    return messages


def render_prompt(tokenizer: Any, record: ToolRecord, *, for_eval: bool = False) -> str:
    """The prompt text through the tokenizer's own chat template, ending in the generation prompt."""
    return tokenizer.apply_chat_template(
        build_messages(record, for_eval=for_eval), tokenize=False, add_generation_prompt=True
    )


def encode_prompts(
    tokenizer: Any, records: Sequence[ToolRecord], *, max_prompt_length: int, for_eval: bool = False
) -> tuple[list[list[int]], list[ToolRecord], DropCounts]:
    """Token ids of each rendered prompt; prompts longer than `max_prompt_length` tokens are
    dropped and counted (`prompt_too_long`). Returns (ids, kept records, drops)."""
    texts = [render_prompt(tokenizer, r, for_eval=for_eval) for r in records]
    # The chat template already wrote every special token, so none are added here.
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    ids, kept, drops = [], [], DropCounts()
    for record, token_ids in zip(records, encoded):
        if len(token_ids) > max_prompt_length:
            drops["prompt_too_long"] += 1
            continue
        ids.append(list(token_ids))
        kept.append(record)
    drops.report("prompts", len(kept), echo=False)
    return ids, kept, drops


def format_completion(answer: Sequence[dict], reasoning: str) -> str:
    """The assistant target: `<think>{reasoning}</think>\\n<tool_call>\\n[...]\\n</tool_call>`."""
    return f"<think>{reasoning}</think>\n{tool_call_block(answer)}"


# End-of-turn markers of the chat templates this project meets (ChatML's two, Llama 3's).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")


def stop_token_ids(tokenizer: Any, model_config: Any = None) -> tuple[int, ...]:
    """Where generation stops, in training rollouts and evaluation alike: the tokenizer's eos,
    the model config's eos id(s), and every `END_OF_TURN_TOKENS` entry the vocabulary has."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    model_eos = getattr(model_config, "eos_token_id", None)
    if model_eos is not None:
        ids.update(int(e) for e in (model_eos if isinstance(model_eos, (tuple, list)) else [model_eos]))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[token]) for token in END_OF_TURN_TOKENS if token in vocab)
    if not ids:
        raise ValueError(
            "the tokenizer has no eos or end-of-turn token and the model config names none: "
            "no stop token for generation"
        )
    return tuple(sorted(ids))


def pad_id_of(tokenizer: Any) -> int:
    """The id that fills rows after they stop: the tokenizer's pad, else its eos, else 0."""
    for tok_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tok_id is not None:
            return int(tok_id)
    return 0
