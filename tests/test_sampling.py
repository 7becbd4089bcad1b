"""The group-rollout sampler: HF greedy parity, log-probs, the sampling distribution and its
filters, group layout, stops, early exit, determinism, bucket reuse and 8-device parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tooln1_jax import sampling
from tooln1_jax.models import ModelConfig, init_params, load_pretrained, logits, param_sharding, save_pretrained
from tooln1_jax.models.params import shard_params
from tooln1_jax.sampling import compiled_program_count, decode_windows, length_bucket, sample, sampling_params
from tooln1_jax.sharding import SAMPLE_RULES, make_mesh
from tooln1_jax.token_draw import inverse_cdf

TINY = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    model_type="qwen2",
)
PROMPTS = [[5, 17, 99, 3, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15], [100]]  # left-padded to one bucket


@pytest.fixture(scope="module")
def tiny_params():
    # Weights 5x the default init, so logits are spread out and greedy has no near-ties.
    params = init_params(TINY, jax.random.PRNGKey(0))
    return jax.tree.map(lambda a: a * 5.0 if a.ndim > 1 else a, params)


def full_logits(config, params, prompt, completion):
    """[len(completion), vocab] logits predicting each completion token, from one full forward."""
    seq = jnp.asarray([list(prompt) + list(completion)], jnp.int32)
    return np.asarray(logits(config, params, seq)[0, len(prompt) - 1 : -1])


def hf_greedy(model, prompts, max_new_tokens, stop, pad_id=0):
    """transformers' greedy generate on a left-padded batch -> [B, max_new_tokens] (pad after stop)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop,
            pad_token_id=pad_id,
        )
    new = out[:, width:].numpy()
    return np.pad(new, ((0, 0), (0, max_new_tokens - new.shape[1])), constant_values=pad_id)


def greedy(config, params, prompts, max_new_tokens, stop=(), num_samples=1, **kw):
    return sample(
        config,
        params,
        prompts,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        stop_token_ids=list(stop),
        rng=jax.random.PRNGKey(0),
        **kw,
    )


def test_greedy_matches_transformers_tiny_qwen2(tiny_params, tmp_path):
    from transformers import AutoModelForCausalLM

    save_pretrained(TINY, tiny_params, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    free = greedy(TINY, tiny_params, PROMPTS, 40)  # three decode segments: caches of 16, 20, 40 slots
    np.testing.assert_array_equal(np.asarray(free.tokens), hf_greedy(model, PROMPTS, 40, stop=None))
    one_loop = greedy(TINY, tiny_params, PROMPTS, 40, decode_segments=1)  # one cache of 40 slots
    np.testing.assert_array_equal(np.asarray(one_loop.tokens), np.asarray(free.tokens))
    # A stop token that the first row emits at column 3: that row stops there, as HF's does.
    stop = int(free.tokens[0, 3])
    ours = greedy(TINY, tiny_params, PROMPTS, 10, stop=[stop], num_samples=2)
    expected = hf_greedy(model, PROMPTS, 10, stop=stop)
    np.testing.assert_array_equal(np.asarray(ours.tokens), np.repeat(expected, 2, axis=0))
    assert int(ours.lengths[0]) <= 4


def test_greedy_matches_transformers_smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, params = load_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    texts = ["What is the capital of France?", "Write a haiku about the sea and the wind in autumn.", "Hi"]
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
        for t in texts
    ]
    prompts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chats]
    assert len(set(map(len, prompts))) == 3
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ours = greedy(config, params, prompts, 12, stop=[stop], pad_id=tokenizer.pad_token_id or 0)
    expected = hf_greedy(model, prompts, 12, stop=stop, pad_id=tokenizer.pad_token_id or 0)
    np.testing.assert_array_equal(np.asarray(ours.tokens), expected)
    assert tokenizer.decode(np.asarray(ours.tokens[0])).startswith("The capital of France is Paris")


def test_logprobs_equal_full_sequence_log_softmax(tiny_params):
    temperature = 0.7
    result = sample(
        TINY,
        tiny_params,
        PROMPTS,
        num_samples=3,
        max_new_tokens=64,
        temperature=temperature,
        stop_token_ids=[1, 2, 3],
        rng=jax.random.PRNGKey(3),
    )
    tokens, lps, mask = map(np.asarray, (result.tokens, result.logprobs, result.mask))
    for row in range(len(PROMPTS) * 3):
        n = int(result.lengths[row])
        ref = jax.nn.log_softmax(full_logits(TINY, tiny_params, PROMPTS[row // 3], tokens[row, :n]) / temperature)
        np.testing.assert_allclose(lps[row, :n], np.asarray(ref)[np.arange(n), tokens[row, :n]], atol=1e-4)
        assert not mask[row, n:].any() and (lps[row, n:] == 0).all()


@pytest.mark.parametrize("vocab", [8192, 151936, 97])
def test_inverse_cdf_picks_the_exact_quantile(vocab):
    """The two-level (block, then within block) draw returns the first index whose cumulative
    mass exceeds u * total, as a float64 cumsum does, and never a zero-mass entry."""
    rng = np.random.default_rng(vocab)
    probs = rng.exponential(size=(64, vocab)) * (rng.random((64, vocab)) < 0.3)  # 70% zero mass
    probs[:, -1] = 0.0
    u = rng.random(64)
    ours, total = map(np.asarray, inverse_cdf(jnp.asarray(probs.T, jnp.float32), jnp.asarray(u, jnp.float32)))
    cdf = np.cumsum(probs, axis=-1)
    np.testing.assert_allclose(total, cdf[:, -1], rtol=1e-5)
    exact = np.argmax(cdf > (u * cdf[:, -1])[:, None], axis=-1)
    assert (probs[np.arange(64), ours] > 0).all()
    # float32 sums may move a draw only when u * total lies within rounding of a boundary
    slack = 1e-5 * cdf[:, -1]
    near = np.abs(cdf[np.arange(64), exact] - u * cdf[:, -1]) < slack
    near |= np.abs(cdf[np.arange(64), np.maximum(exact - 1, 0)] - u * cdf[:, -1]) < slack
    assert ((ours == exact) | near).all() and (ours == exact).mean() > 0.95


def _first_token_frequencies(params, prompt, draws, **kw):
    result = sample(
        TINY, params, [prompt], num_samples=draws, max_new_tokens=1, stop_token_ids=[], rng=jax.random.PRNGKey(11), **kw
    )
    return np.bincount(np.asarray(result.tokens[:, 0]), minlength=TINY.vocab_size) / draws


def _tv(p, q):
    return 0.5 * np.abs(p - q).sum()


def test_first_token_frequencies_match_softmax(tiny_params):
    # 8000 draws over 128 tokens: E[TV(empirical, true)] <= 0.5 * sqrt(2 / pi) * sqrt(128 / 8000) ~ 0.05.
    prompt, temperature, draws, tolerance = PROMPTS[0], 0.5, 8000, 0.06
    row_logits = full_logits(TINY, tiny_params, prompt, [0])[0]
    target = np.asarray(jax.nn.softmax(row_logits / temperature))
    wrong = np.asarray(jax.nn.softmax(row_logits))  # the untempered law: the test must tell them apart
    assert _tv(target, wrong) > 2 * tolerance
    freq = _first_token_frequencies(tiny_params, prompt, draws, temperature=temperature)
    assert _tv(freq, target) < tolerance


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.6), (12, 0.5)])
def test_top_k_top_p_support_and_law_match_transformers(tiny_params, top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    def hf_law(row_logits, temperature):
        scores = torch.tensor(np.asarray(row_logits))[None] / temperature
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        return torch.softmax(scores, -1)[0].numpy()

    prompt, temperature, draws = PROMPTS[1], 1.5, 3000
    law = hf_law(full_logits(TINY, tiny_params, prompt, [0])[0], temperature)
    support = law > 0
    assert 1 < support.sum() < TINY.vocab_size
    freq = _first_token_frequencies(tiny_params, prompt, draws, temperature=temperature, top_k=top_k, top_p=top_p)
    assert freq[~support].sum() == 0
    assert _tv(freq, law) < 0.5 * np.sqrt(2 / np.pi) * np.sqrt(support.sum() / draws) + 0.02
    # Later steps too: every sampled token lies in HF's filtered support given its prefix.
    result = sample(
        TINY,
        tiny_params,
        PROMPTS,
        num_samples=2,
        max_new_tokens=6,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_token_ids=[],
        rng=jax.random.PRNGKey(5),
    )
    tokens = np.asarray(result.tokens)
    for row in range(tokens.shape[0]):
        step_logits = full_logits(TINY, tiny_params, PROMPTS[row // 2], tokens[row])
        for t, token in enumerate(tokens[row]):
            assert hf_law(step_logits[t], temperature)[token] > 0, (row, t, token)


def test_group_layout(tiny_params):
    result = sample(
        TINY,
        tiny_params,
        PROMPTS,
        num_samples=4,
        max_new_tokens=5,
        temperature=0.0,
        stop_token_ids=[],
        rng=jax.random.PRNGKey(0),
    )
    assert result.tokens.shape == result.logprobs.shape == result.mask.shape == (12, 5)
    for i, prompt in enumerate(PROMPTS):
        alone = greedy(TINY, tiny_params, [prompt], 5)
        np.testing.assert_array_equal(np.asarray(result.tokens[4 * i : 4 * i + 4]), np.repeat(alone.tokens, 4, axis=0))
    # Sampling: the n rows of a group differ from each other (each draws its own randomness).
    sampled = sample(
        TINY,
        tiny_params,
        PROMPTS,
        num_samples=4,
        max_new_tokens=5,
        temperature=1.0,
        stop_token_ids=[],
        rng=jax.random.PRNGKey(1),
    )
    assert len({tuple(r) for r in np.asarray(sampled.tokens[:4]).tolist()}) > 1


def test_stop_handling_masks_everything_after_the_first_stop(tiny_params):
    stops = list(range(0, 128, 6))  # ~1/6 of the vocabulary: most rows stop within 16 tokens
    result = sample(
        TINY,
        tiny_params,
        PROMPTS,
        num_samples=8,
        max_new_tokens=16,
        temperature=1.5,
        stop_token_ids=stops,
        rng=jax.random.PRNGKey(2),
        pad_id=127,
    )
    tokens, lps, mask, lengths = map(np.asarray, (result.tokens, result.logprobs, result.mask, result.lengths))
    stopped = 0
    for row in range(tokens.shape[0]):
        is_stop = np.isin(tokens[row], stops)
        n = int(lengths[row])
        assert mask[row].tolist() == [True] * n + [False] * (16 - n)
        assert not is_stop[: n - 1].any()  # no stop before the last kept token
        if is_stop[n - 1]:
            stopped += 1
            assert (tokens[row, n:] == 127).all() and (lps[row, n:] == 0).all()
        else:
            assert n == 16
        assert (lps[row, :n] < 0).all()
    assert stopped > tokens.shape[0] // 2


def test_decode_windows():
    assert decode_windows(128) == (16, 32, 64, 128)
    assert decode_windows(8192, 6) == (256, 512, 1024, 2048, 4096, 8192)
    assert decode_windows(40) == (16, 20, 40)
    assert decode_windows(20) == (16, 20)
    assert decode_windows(10) == (10,)
    assert decode_windows(1) == (1,)
    assert decode_windows(128, 1) == (128,)


def test_early_exit_counts_decode_steps(tiny_params):
    free = greedy(TINY, tiny_params, PROMPTS, 20, num_samples=2)  # two decode segments
    assert int(free.num_steps) == 20
    stops = sorted(set(np.asarray(free.tokens[:, 2]).tolist()))  # every row stops by column 2
    early = greedy(TINY, tiny_params, PROMPTS, 20, stop=stops, num_samples=2)
    assert int(early.num_steps) == int(early.lengths.max()) <= 3 < 20
    np.testing.assert_array_equal(np.asarray(early.tokens[:, :1]), np.asarray(free.tokens[:, :1]))


def test_deterministic_per_rng(tiny_params):
    run = lambda rng: sample(
        TINY, tiny_params, PROMPTS, num_samples=3, max_new_tokens=6, temperature=1.0, stop_token_ids=[4], rng=rng
    )
    a, b, c = run(jax.random.PRNGKey(7)), run(jax.random.PRNGKey(7)), run(jax.random.PRNGKey(8))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    # Typed keys give the same stream as raw uint32 keys.
    typed = run(jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(typed.tokens))


def test_prompt_buckets_reuse_compiled_programs(tiny_params):
    assert [length_bucket(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]
    assert [length_bucket(n, cap=48) for n in (1, 17, 40, 48)] == [16, 32, 48, 48]
    kw = dict(num_samples=2, max_new_tokens=4, temperature=1.0, stop_token_ids=[9], rng=jax.random.PRNGKey(0))
    sample(TINY, tiny_params, [[1, 2, 3], [4] * 20], **kw)
    before = compiled_program_count()
    sample(TINY, tiny_params, [[5] * 30, [6, 7]], **kw)  # same bucket (32), same batch
    assert compiled_program_count() == before
    sample(TINY, tiny_params, [[5] * 40, [6, 7]], **kw)  # bucket 64: one new prefill + decode
    assert compiled_program_count() == before + 2


def test_eight_devices_give_the_same_tokens_as_one(tiny_params):
    assert len(jax.devices()) == 8
    mesh = make_mesh(data=2, fsdp=4)
    kw = dict(
        num_samples=2, max_new_tokens=20, temperature=1.0, top_k=20, stop_token_ids=[4, 5], rng=jax.random.PRNGKey(4)
    )  # two decode segments: the cache grows under the mesh
    prompts = PROMPTS + [[3, 1, 4, 1, 5, 9, 2, 6]]  # 8 rows: one per device
    one = sample(TINY, tiny_params, prompts, **kw)
    eight = sample(TINY, tiny_params, prompts, mesh=mesh, rules=SAMPLE_RULES, **kw)
    assert len(eight.tokens.sharding.device_set) == 8 and eight.tokens.sharding.spec[0] is not None
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(eight.tokens))
    # float32 sums split over 4 fsdp shards add in another order: equal to a few ulps, not bitwise
    np.testing.assert_allclose(np.asarray(one.logprobs), np.asarray(eight.logprobs), rtol=1e-5, atol=1e-5)


def test_a_bf16_run_samples_from_one_bf16_copy_with_the_masters_tokens(tiny_params, monkeypatch):
    config = TINY.replace(dtype="bfloat16")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    copy = sampling_params(config, tiny_params, mesh, SAMPLE_RULES)
    assert {x.dtype for x in jax.tree.leaves(copy)} == {jnp.dtype(jnp.bfloat16)}
    assert jax.tree.map(lambda x: x.sharding, copy) == param_sharding(config, mesh, SAMPLE_RULES)
    assert sampling_params(TINY, tiny_params) is tiny_params  # float32 compute: nothing copied

    kw = dict(num_samples=2, max_new_tokens=12, temperature=1.0, stop_token_ids=[4], rng=jax.random.PRNGKey(3))
    prompts = PROMPTS + [[3, 1, 4, 1, 5, 9, 2, 6]]
    cast_first = sample(config, tiny_params, prompts, mesh=mesh, rules=SAMPLE_RULES, **kw)
    # before: the sampler resharded the float32 masters and every forward cast them on use
    monkeypatch.setattr(sampling, "sampling_params", lambda c, p, m, r: shard_params(p, c, m, r))
    from_masters = sample(config, tiny_params, prompts, mesh=mesh, rules=SAMPLE_RULES, **kw)
    np.testing.assert_array_equal(np.asarray(cast_first.tokens), np.asarray(from_masters.tokens))
    np.testing.assert_array_equal(np.asarray(cast_first.logprobs), np.asarray(from_masters.logprobs))


def test_bad_input_is_named():
    params = None  # never reached: validation comes first
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sample(TINY, params, [[1], []], num_samples=1, max_new_tokens=2, temperature=1.0, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="outside"):
        sample(TINY, params, [[1, 500]], num_samples=1, max_new_tokens=2, temperature=1.0, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="top_p"):
        sample(
            TINY, params, [[1]], num_samples=1, max_new_tokens=2, temperature=1.0, top_p=0.0, rng=jax.random.PRNGKey(0)
        )
    with pytest.raises(ValueError, match="decode_segments"):
        sample(
            TINY,
            params,
            [[1]],
            num_samples=1,
            max_new_tokens=2,
            temperature=1.0,
            decode_segments=0,
            rng=jax.random.PRNGKey(0),
        )
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sample(TINY, params, [[1] * 200], num_samples=1, max_new_tokens=100, temperature=1.0, rng=jax.random.PRNGKey(0))
