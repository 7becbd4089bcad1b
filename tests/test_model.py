"""The decoder against transformers' PyTorch Qwen2/Llama, the KV cache, dtypes, remat, presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tooln1_jax.models import (
    PRESETS,
    ModelConfig,
    forward_cached,
    init_cache,
    init_params,
    lm_head_weight,
    logits,
    preset,
)
from tooln1_jax.models.group_decode import decode_weights, group_decode_step, rope_lookup_table
from tooln1_jax.models.hf_io import hf_tensor_name
from tooln1_jax.models.params import param_shapes

# (name, config): tied/untied, GQA ratios 1, 2, 4, head_dim apart from hidden/heads, rope_theta.
CONFIGS = {
    "qwen2-tied-gqa1": ModelConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=8,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "qwen2-untied-gqa2": ModelConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=80,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=12,
        rope_theta=1e4,
        rms_norm_eps=1e-5,
    ),
    "llama-untied-gqa4": ModelConfig(
        vocab_size=89,
        hidden_size=32,
        intermediate_size=72,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=5e5,
        attention_bias=False,
        model_type="llama",
    ),
    "llama-tied-gqa2-hd32": ModelConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=32,
        rope_theta=1e4,
        attention_bias=False,
        model_type="llama",
        tie_word_embeddings=True,
    ),
}


def torch_model(config: ModelConfig, seed: int = 0):
    """A transformers model with every weight random (biases and norms included), float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = config.to_hf()
    hf_config = AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def params_from_torch(config: ModelConfig, model) -> dict:
    """The torch state dict in our layout (transposed Linear weights, layers stacked)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    def get(name, transposed):
        return sd[name].T if transposed else sd[name]

    shapes = param_shapes(config)
    params = {leaf: jnp.asarray(get(*hf_tensor_name(leaf))) for leaf in shapes if leaf != "layers"}
    params["layers"] = {
        leaf: jnp.asarray(np.stack([get(*hf_tensor_name(leaf, i)) for i in range(config.num_layers)]))
        for leaf in shapes["layers"]
    }
    return params


def left_padded_batch(vocab: int, lengths=(9, 6, 3), seed: int = 0):
    """input_ids, attention_mask [B, T] numpy with rows left-padded to the longest."""
    rng = np.random.RandomState(seed)
    t = max(lengths)
    ids = rng.randint(0, vocab, (len(lengths), t))
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, t - n :] = 1
        ids[row, : t - n] = 0
    return ids, mask


def torch_logits(model, ids, mask) -> np.ndarray:
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # as transformers' generate does
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        )
    return out.logits.numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_on_left_padded_batch(name):
    config = CONFIGS[name]
    model = torch_model(config)
    params = params_from_torch(config, model)
    assert ("lm_head" in params) == (not config.tie_word_embeddings)
    ids, mask = left_padded_batch(config.vocab_size)
    ours = np.asarray(logits(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    ref = torch_logits(model, ids, mask)
    real = mask.astype(bool)
    assert ours.shape == (3, 9, config.vocab_size)
    assert np.abs(ours[real] - ref[real]).max() < 1e-4
    # The unpadded row alone gives the same logits as inside the padded batch.
    alone = np.asarray(logits(config, params, jnp.asarray(ids[2:, -3:])))
    assert np.abs(alone[0] - ours[2, -3:]).max() < 1e-5


@pytest.mark.parametrize("name", ["qwen2-untied-gqa2", "llama-tied-gqa2-hd32"])
def test_prefill_then_decode_equals_full_forward(name):
    config = CONFIGS[name]
    params = init_params(config, jax.random.key(1))
    ids, mask = left_padded_batch(config.vocab_size, lengths=(9, 7, 4), seed=1)
    full = np.asarray(logits(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    prefill = 5  # rows 1 and 2 still have padding inside the prefill window
    cache = init_cache(config, batch=3, max_len=12)
    step = jax.jit(forward_cached, static_argnums=0)
    hidden, cache = step(config, params, jnp.asarray(ids[:, :prefill]), jnp.asarray(mask[:, :prefill]), cache)
    outs = [hidden]
    for t in range(prefill, ids.shape[1]):
        hidden, cache = step(config, params, jnp.asarray(ids[:, t : t + 1]), jnp.asarray(mask[:, t : t + 1]), cache)
        outs.append(hidden)
    cached = np.asarray(jnp.concatenate(outs, axis=1) @ lm_head_weight(params))
    assert int(cache.index) == ids.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.mask[:, : ids.shape[1]]), mask)
    real = mask.astype(bool)
    assert np.abs(cached[real] - full[real]).max() < 1e-5
    # A last-position-only prefill: the same last hidden state and the same cache.
    fresh = init_cache(config, batch=3, max_len=12)
    last, last_cache = jax.jit(forward_cached, static_argnums=(0, 5))(
        config, params, jnp.asarray(ids), jnp.asarray(mask), fresh, True
    )
    every, every_cache = step(config, params, jnp.asarray(ids), jnp.asarray(mask), fresh)
    assert last.shape == (3, 1, config.hidden_size)
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(every[:, -1]), atol=1e-5)
    for a, b in zip(jax.tree.leaves(last_cache), jax.tree.leaves(every_cache)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_compute_runs_and_stays_close():
    config = CONFIGS["qwen2-untied-gqa2"]
    params = init_params(config, jax.random.key(2))
    ids, mask = left_padded_batch(config.vocab_size)
    ref = np.asarray(logits(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    bf16 = config.replace(dtype="bfloat16")
    for p in (params, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)):
        out = logits(bf16, p, jnp.asarray(ids), jnp.asarray(mask))
        assert out.dtype == jnp.float32  # logits always come back in float32
        out = np.asarray(out)
        real = mask.astype(bool)
        assert np.isfinite(out[real]).all()
        assert np.abs(out[real] - ref[real]).max() < 0.02 * np.abs(ref[real]).max() + 1e-3
        assert np.abs(out[real] - ref[real]).max() > 0  # it really ran in bf16


def test_remat_gives_same_logits_and_gradients():
    config = CONFIGS["llama-untied-gqa4"]
    params = init_params(config, jax.random.key(3))
    ids, mask = left_padded_batch(config.vocab_size)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    def loss(p, cfg):
        lp = jax.nn.log_softmax(logits(cfg, p, ids, mask)[:, :-1])
        picked = jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
        return -(picked * mask[:, 1:]).sum()

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    ref_val, ref_grad = value_and_grad(params, config)
    for remat in ("full", "dots"):
        val, grad = value_and_grad(params, config.replace(remat=remat))
        assert abs(float(val) - float(ref_val)) < 1e-4
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), grad, ref_grad))
        assert max(diffs) < 1e-5
    assert max(jax.tree.leaves(jax.tree.map(lambda g: float(jnp.abs(g).max()), ref_grad))) > 0


# Published Qwen2.5-*-Instruct sizes (model cards): total parameters.
PUBLISHED_PARAMS = {
    "Qwen/Qwen2.5-0.5B-Instruct": 0.49e9,
    "Qwen/Qwen2.5-1.5B-Instruct": 1.54e9,
    "Qwen/Qwen2.5-3B-Instruct": 3.09e9,
    "Qwen/Qwen2.5-7B-Instruct": 7.61e9,
    "Qwen/Qwen2.5-14B-Instruct": 14.7e9,
    "Qwen/Qwen2.5-32B-Instruct": 32.5e9,
    "Qwen/Qwen2.5-72B-Instruct": 72.7e9,
}


def test_presets_match_published_configs():
    assert set(PRESETS) == set(PUBLISHED_PARAMS)
    for name, count in PUBLISHED_PARAMS.items():
        cfg = PRESETS[name]
        assert abs(cfg.num_params / count - 1) < 0.01, (name, cfg.num_params)
        assert cfg.head_dim * cfg.num_heads == cfg.hidden_size
        assert cfg.model_type == "qwen2" and cfg.attention_bias and cfg.rope_theta == 1e6
        # config.json round trip (the compute dtype is ours, not part of config.json)
        assert ModelConfig.from_hf(cfg.to_hf(), dtype=cfg.dtype) == cfg
    seven = preset("qwen2.5-7b-instruct")
    assert (seven.hidden_size, seven.intermediate_size, seven.num_layers) == (3584, 18944, 28)
    assert (seven.num_heads, seven.num_kv_heads, seven.vocab_size) == (28, 4, 152064)
    assert not seven.tie_word_embeddings and preset("Qwen2.5-0.5B-Instruct").tie_word_embeddings
    # The count matches the actual params tree.
    small = CONFIGS["qwen2-untied-gqa2"]
    shapes = jax.tree.leaves(param_shapes(small), is_leaf=lambda x: isinstance(x, tuple))
    assert small.num_params == sum(int(np.prod(s)) for s in shapes)
    with pytest.raises(KeyError, match="unknown model preset"):
        preset("Qwen2.5-9B")


def test_bad_configs_are_rejected_with_the_field_named():
    base = CONFIGS["qwen2-untied-gqa2"]
    with pytest.raises(ValueError, match="num_kv_heads"):
        base.replace(num_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        base.replace(remat="some")
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf({**base.to_hf(), "model_type": "gpt2"})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_group_decode_step_equals_full_forward(name):
    """The sampler's step (fused, transposed weights; n rows sharing a prompt's cache; the
    rotary table) gives the full forward's next-token logits, for left-padded prompts of
    different lengths."""
    config = CONFIGS[name]
    shapes = init_params(config, jax.random.key(0))
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    params = jax.tree.unflatten(
        treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )  # biases too
    ids, mask = left_padded_batch(config.vocab_size, lengths=(6, 3), seed=5)
    n, steps = 3, 3
    prefill = jax.jit(forward_cached, static_argnums=0)
    _, prefix = prefill(config, params, jnp.asarray(ids), jnp.asarray(mask), init_cache(config, 2, ids.shape[1]))
    weights = decode_weights(config, params)
    step = jax.jit(group_decode_step, static_argnums=0)
    rng = np.random.default_rng(6)
    new = rng.integers(0, config.vocab_size, (2 * n, steps))
    cache = init_cache(config, 2 * n, steps)
    rope = rope_lookup_table(config, ids.shape[1] + steps)
    for t in range(steps):
        got, cache = step(config, weights, jnp.asarray(new[:, t]), prefix, cache, rope)
        for row in range(2 * n):
            prompt = ids[row // n][mask[row // n] > 0]
            full = np.concatenate([prompt, new[row, : t + 1]])
            ref = np.asarray(logits(config, params, jnp.asarray(full[None])))[0, -1]
            np.testing.assert_allclose(np.asarray(got[:, row]), ref, atol=1e-4, rtol=1e-4)
