"""SFT (loss on assistant tokens only, a few steps learn) and the tiny demo tokenizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from tooln1_jax.config import default_config
from tooln1_jax.data.prompt import format_completion, render_prompt
from tooln1_jax.data.synthetic import SyntheticConfig, generate, template_reasoning
from tooln1_jax.data.tiny_tokenizer import MARKUP_TOKENS, SPECIAL_TOKENS, build_tiny_tokenizer, phrase_tokens
from tooln1_jax.data.xlam import convert_rows
from tooln1_jax.models import ModelConfig, init_params, logits
from tooln1_jax.sft import completion_text, encode_sft, run_sft, sft_loss


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def records():
    return convert_rows(generate(16, SyntheticConfig(num_tools=2, max_calls=1), seed=11), source="synthetic")[0]


def _model(tok, hidden=32):
    return ModelConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=hidden // 2,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
    )


def test_tokenizer_round_trips_and_markup_is_single_tokens(tok, records, tmp_path):
    assert 500 <= len(tok) <= 2100
    for t in SPECIAL_TOKENS + MARKUP_TOKENS:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    text = 'Zürich 3.5°C — {"a": [1, 2]} <think>x</think><tool_call>[]</tool_call> 日本'
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    prompt = render_prompt(tok, records[0])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\n" + records[0].conversations[0]["content"] + "<|im_end|>\n" in prompt
    full = prompt + completion_text(records[0])
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == full
    # The constant system-prompt paragraphs are one token each, so CPU prompts stay short.
    for phrase in phrase_tokens():
        assert len(tok(phrase, add_special_tokens=False)["input_ids"]) == 1
    assert len(tok(render_prompt(tok, records[0], for_eval=True), add_special_tokens=False)["input_ids"]) < 200
    tok.save_pretrained(tmp_path)
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert again(full, add_special_tokens=False)["input_ids"] == ids
    assert (
        again.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert again.eos_token == "<|im_end|>" and again.pad_token == "<|endoftext|>"


def test_tokenizer_is_deterministic(tok):
    assert build_tiny_tokenizer().get_vocab() == tok.get_vocab()


def test_loss_mask_covers_exactly_the_assistant_tokens(tok, records):
    data = encode_sft(tok, records, max_prompt_length=512, max_completion_length=64)
    p = data.prompt_width
    for i, r in enumerate(data.records):
        target = data.input_ids[i, p:][data.loss_mask[i] > 0]
        assert tok.decode(target) == completion_text(r) + "<|im_end|>"
        prompt = data.input_ids[i, :p][data.attention_mask[i, :p] > 0]
        assert tok.decode(prompt) == render_prompt(tok, r)
        # Nothing real after the stop token; left padding before the prompt only.
        n = int(data.loss_mask[i].sum())
        assert data.attention_mask[i, p + n :].sum() == 0 and data.loss_mask[i, n:].sum() == 0


def test_sft_loss_is_the_mean_nll_of_completion_tokens_only(tok, records):
    data = encode_sft(tok, records[:6], max_prompt_length=512, max_completion_length=64)
    mc = _model(tok)
    params = init_params(mc, jax.random.key(1))
    ids, attn, lmask = map(jnp.asarray, (data.input_ids, data.attention_mask, data.loss_mask))
    got = sft_loss(mc, params, ids, attn, lmask, data.prompt_width)

    logp = jax.nn.log_softmax(logits(mc, params, ids, attn), axis=-1)  # [B, T, V]
    picked = jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]  # predicts token t+1
    full_mask = jnp.concatenate([jnp.zeros((ids.shape[0], data.prompt_width - 1)), lmask], axis=1)  # [B, T-1]
    want = -jnp.sum(picked * full_mask) / jnp.sum(full_mask)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)

    # Tokens after the stop token (right padding) are neither targets nor context.
    scrambled = np.array(data.input_ids)
    p = data.prompt_width
    for i in range(len(data)):
        n = int(data.loss_mask[i].sum())
        scrambled[i, p + n :] = (np.arange(scrambled.shape[1] - p - n) * 7 + 3) % len(tok)
    np.testing.assert_allclose(
        float(sft_loss(mc, params, jnp.asarray(scrambled), attn, lmask, p)), float(got), rtol=1e-6
    )


def test_a_few_sft_steps_lower_the_loss(tok, records):
    config = default_config()
    config.sft.lr = 3e-3
    config.sft.batch_size = 8
    config.sft.warm_start_steps = 30
    config.sft.max_completion_length = 64
    mc = _model(tok)
    params = init_params(mc, jax.random.key(2))
    data = encode_sft(tok, records[:8], max_prompt_length=512, max_completion_length=64)
    params, metrics = run_sft(config, mc, params, tok, records, data=data)
    losses = metrics["sft_losses"]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_warm_start_stops_at_the_first_probe_inside_the_band(tok, records):
    """The stop rule: a probe every `probe_every` steps, SFT ends at the first reading with the format
    learnt and accuracy >= stop_accuracy (here the fourth: the third is accurate enough but fails
    the format too often), with the params of a plain run of that many steps; a probe past the
    band's top stops SFT outside the band; a band never reached runs to the cap."""
    config = default_config()
    config.sft.update(lr=3e-3, batch_size=4, max_completion_length=64, warm_start_steps=12, probe_every=2)
    config.sft.update(stop_accuracy=0.3, stop_accuracy_max=0.6, stop_format_failure_max=0.1)
    mc = _model(tok)
    start = init_params(mc, jax.random.key(4))
    data = encode_sft(tok, records[:8], max_prompt_length=512, max_completion_length=64)
    readings = iter([(0.0, 0.9), (0.12, 0.2), (0.31, 0.15), (0.34, 0.05), (0.9, 0.0)])
    probed = []

    def probe(params):
        probed.append(params)
        accuracy, format_failure_rate = next(readings)
        return {"accuracy": accuracy, "format_failure_rate": format_failure_rate, "num_scored": 50}

    stopped, metrics = run_sft(config, mc, start, tok, records, data=data, probe=probe)
    assert metrics["sft_steps"] == 8 and metrics["sft_stopped_by_probe"] and metrics["sft_stopped_in_band"]
    steps_read = [(p["sft_steps"], p["accuracy"]) for p in metrics["sft_probes"]]
    assert steps_read == [(2, 0.0), (4, 0.12), (6, 0.31), (8, 0.34)]
    assert len(metrics["sft_losses"]) == 8 and len(probed) == 4
    config.sft.warm_start_steps = 8  # the comparison below is a plain run of as many steps
    plain, _ = run_sft(config, mc, start, tok, records, data=data)  # no probe: a fixed count
    for a, b in zip(jax.tree.leaves(stopped), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    config.sft.warm_start_steps = 12
    jump = iter([0.1, 0.8])  # over the band's top: stopped by the probe, but not inside the band
    _, over = run_sft(
        config,
        mc,
        start,
        tok,
        records,
        data=data,
        probe=lambda p: {"accuracy": next(jump), "format_failure_rate": 0.0, "num_scored": 50},
    )
    assert over["sft_steps"] == 4 and over["sft_stopped_by_probe"] and not over["sft_stopped_in_band"]

    config.sft.update(stop_accuracy=0.95, stop_accuracy_max=1.0)  # never reached: the cap ends it
    _, capped = run_sft(
        config,
        mc,
        start,
        tok,
        records,
        data=data,
        probe=lambda p: {"accuracy": 0.5, "format_failure_rate": 0.0, "num_scored": 50},
    )
    assert capped["sft_steps"] == 12 and not capped["sft_stopped_by_probe"] and len(capped["sft_probes"]) == 5
    assert not capped["sft_stopped_in_band"]


def test_sft_on_an_8_device_mesh_matches_one_device(tok, records):
    from tooln1_jax.sharding import make_mesh

    config = default_config()
    config.sft.lr = 1e-3
    config.sft.batch_size = 8
    config.sft.max_completion_length = 64
    mc = _model(tok)
    data = encode_sft(tok, records[:8], max_prompt_length=512, max_completion_length=64)
    start = init_params(mc, jax.random.key(3))
    _, one = run_sft(config, mc, start, tok, records, data=data, steps=3)
    _, eight = run_sft(config, mc, start, tok, records, data=data, steps=3, mesh=make_mesh(data=1, fsdp=-1, tensor=1))
    np.testing.assert_allclose(one["sft_losses"], eight["sft_losses"], rtol=1e-4)


def test_too_long_targets_are_dropped_and_counted(tok, records):
    lengths = sorted(len(tok(completion_text(r), add_special_tokens=False)["input_ids"]) + 1 for r in records)
    limit = lengths[len(lengths) // 2]  # keeps the shorter half (ties included)
    data = encode_sft(tok, records, max_prompt_length=512, max_completion_length=limit)
    assert data.drops["completion_too_long"] == sum(n > limit for n in lengths) > 0
    assert len(data) + data.drops["completion_too_long"] == len(records)
    with pytest.raises(ValueError, match="no example left"):
        encode_sft(tok, records, max_prompt_length=8, max_completion_length=64)
    assert format_completion(records[0].answer, template_reasoning(records[0].answer)) == completion_text(records[0])
