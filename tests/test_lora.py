"""LoRA (models/lora.py): the config section, adapters that follow their base layer's axes,
merge == the unmerged forward, the GRPO step with the base as its own reference (exactly the
full-model path with a frozen copy when the adapters are zero), the sampler on merged weights,
and the sharded step on 8 devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tooln1_jax.config import ConfigError, default_config, lora_settings, validate_config
from tooln1_jax.grpo import LossSettings
from tooln1_jax.models import ModelConfig, init_params, logits, shard_params
from tooln1_jax.models.lora import (
    abstract_adapters,
    adapter_shapes,
    adapter_sharding,
    attach,
    init_adapters,
    merge,
    merged_params,
)
from tooln1_jax.optimizer import OptimizerSettings, make_optimizer
from tooln1_jax.sampling import sample
from tooln1_jax.settings import LORA_TARGETS, LoraSettings
from tooln1_jax.sharding import SAMPLE_RULES, TRAIN_RULES, make_mesh
from tooln1_jax.train_step import init_train_state, loss_and_grads, make_grpo_step, shard_batch

QWEN = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    tie_word_embeddings=True,
    max_position_embeddings=128,
)
LLAMA = QWEN.replace(model_type="llama", attention_bias=False, tie_word_embeddings=False)
LORA = LoraSettings(rank=4, alpha=8.0)
B, P, C = 8, 6, 6
TEMP = 0.7
KL = LossSettings(kl_coef=0.05)


def spread(params):
    """Weights 5x the default init, so logits are spread out and greedy has no near-ties."""
    return jax.tree.map(lambda a: a * 5.0 if a.ndim > 1 else a, params)


def trained_adapters(config, lora=LORA, seed=1):
    """Adapters as after training: A as initialised, B random (a fresh B is zero); norms (with
    `train_norms`) as the default init's."""
    adapters = init_adapters(config, lora, jax.random.key(seed), base=init_params(config, jax.random.key(0)))
    keys = iter(jax.random.split(jax.random.key(seed + 100), 64))
    return jax.tree.map(
        lambda x: 0.3 * jax.random.normal(next(keys), x.shape) if x.ndim == 3 and x.shape[1] == lora.rank else x,
        adapters,
    )


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, QWEN.vocab_size, (B, P + C)).astype(np.int32)
    prompt_len, completion_len = rng.integers(2, P + 1, B), rng.integers(1, C + 1, B)
    cols = np.arange(P + C)[None]
    attn = ((cols >= P - prompt_len[:, None]) & (cols < P + completion_len[:, None])).astype(np.int32)
    loss_mask = ((cols >= P) & (cols < P + completion_len[:, None])).astype(np.float32)
    old = (-np.log(QWEN.vocab_size) + rng.normal(scale=0.5, size=(B, P + C))).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    return dict(
        input_ids=np.where(attn == 1, ids, 0),
        attention_mask=attn,
        loss_mask=loss_mask,
        advantages=adv,
        old_logprobs=old,
    )


# ----------------------------------------------------------------------------- config


def test_config_lora_is_off_by_default_and_validated():
    c = default_config()
    assert not lora_settings(validate_config(c)).enabled
    c.lora.rank, c.lora.targets = 8, "q, v,down"
    assert lora_settings(validate_config(c)) == LoraSettings(rank=8, alpha=16.0, targets=("q", "v", "down"))
    assert lora_settings(c).target_leaves == ("q_proj", "v_proj", "down_proj")
    for field, value, message in (
        ("targets", "q,lm_head", "config.lora.targets='q,lm_head' must be distinct comma-separated names"),
        ("targets", "q,q", "must be distinct"),
        ("dropout", 0.1, "config.lora.dropout=0.1 is not implemented"),
        ("rank", -1, "config.lora.rank=-1 must be >= 0"),
        ("alpha", 0.0, "config.lora.alpha=0.0 must be positive"),
    ):
        bad = default_config()
        bad.lora.rank = 8
        bad.lora[field] = value
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            validate_config(bad)


# ----------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("config", [QWEN, LLAMA], ids=["qwen2", "llama"])
def test_adapters_follow_their_base_layer_and_merge_equals_the_unmerged_forward(config):
    adapters = init_adapters(config, LORA, jax.random.key(0))
    assert set(adapters["layers"]) == {f"{t}_proj" for t in LORA_TARGETS}
    shapes = adapter_shapes(config, LORA)["layers"]
    assert shapes["q_proj"] == {"a": (2, 32, 4), "b": (2, 4, 32)}
    assert shapes["down_proj"] == {"a": (2, 64, 4), "b": (2, 4, 32)}
    assert jax.tree.map(lambda x: (x.shape, x.dtype), adapters) == jax.tree.map(
        lambda s: (s, jnp.float32), adapter_shapes(config, LORA), is_leaf=lambda x: isinstance(x, tuple)
    )
    a = np.asarray(adapters["layers"]["q_proj"]["a"])
    assert 0 < np.abs(a).max() <= 1 / np.sqrt(32) and not np.any(np.asarray(adapters["layers"]["q_proj"]["b"]))

    params = spread(init_params(config, jax.random.key(0)))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 10)), jnp.int32)
    base = np.asarray(logits(config, params, ids))
    # fresh adapters (B = 0) change nothing, attached or merged
    np.testing.assert_array_equal(np.asarray(logits(config, attach(params, adapters, LORA), ids)), base)
    np.testing.assert_array_equal(np.asarray(logits(config, merge(params, adapters, LORA), ids)), base)
    trained = trained_adapters(config)
    unmerged = np.asarray(logits(config, attach(params, trained, LORA), ids))
    assert np.abs(unmerged - base).max() > 1.0  # the adapters matter
    np.testing.assert_allclose(np.asarray(logits(config, merge(params, trained, LORA), ids)), unmerged, atol=2e-4)
    # merge is W + (alpha / rank) A @ B on the adapted weights, and leaves the others alone
    merged = merge(params, trained, LORA)
    q = trained["layers"]["q_proj"]
    np.testing.assert_allclose(
        merged["layers"]["q_proj"][1], params["layers"]["q_proj"][1] + 2.0 * q["a"][1] @ q["b"][1], atol=1e-6
    )
    assert merged["layers"]["input_norm"] is params["layers"]["input_norm"]


def test_trained_norms_start_from_the_base_and_merge_as_they_attach():
    lora = LoraSettings(rank=4, alpha=8.0, train_norms=True)
    params = spread(init_params(QWEN, jax.random.key(0)))
    params["final_norm"] = params["final_norm"] * 1.5  # a base whose norms are not all ones
    with pytest.raises(ValueError, match="train_norms starts the norms from the base; pass base="):
        init_adapters(QWEN, lora, jax.random.key(0))
    adapters = init_adapters(QWEN, lora, jax.random.key(0), base=params)
    norms = adapters["norms"]
    assert jax.tree.map(lambda x: (x.shape, x.dtype), norms) == {
        "layers": {"input_norm": ((2, 32), jnp.float32), "post_attn_norm": ((2, 32), jnp.float32)},
        "final_norm": ((32,), jnp.float32),
    }
    assert adapter_shapes(QWEN, lora)["norms"]["final_norm"] == (32,)
    np.testing.assert_array_equal(norms["final_norm"], params["final_norm"])
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 10)), jnp.int32)
    base = np.asarray(logits(QWEN, params, ids))
    np.testing.assert_array_equal(np.asarray(logits(QWEN, merge(params, adapters, lora), ids)), base)

    trained = trained_adapters(QWEN, lora)
    trained["norms"] = jax.tree.map(lambda x: x * 3.0, trained["norms"])
    unmerged = np.asarray(logits(QWEN, attach(params, trained, lora), ids))
    assert np.abs(unmerged - np.asarray(logits(QWEN, attach(params, trained_adapters(QWEN), LORA), ids))).max() > 1
    np.testing.assert_allclose(np.asarray(logits(QWEN, merge(params, trained, lora), ids)), unmerged, atol=2e-4)
    merged = merge(params, trained, lora)
    np.testing.assert_array_equal(merged["layers"]["post_attn_norm"], trained["norms"]["layers"]["post_attn_norm"])


def test_a_bfloat16_base_keeps_its_dtype_and_float32_adapters():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params(QWEN, jax.random.key(0)))
    trained = trained_adapters(QWEN)
    merged = merge(params, trained, LORA)
    assert {x.dtype for x in jax.tree.leaves(merged)} == {jnp.dtype(jnp.bfloat16)}
    ids = jnp.ones((1, 4), jnp.int32)
    grads = jax.grad(lambda a: jnp.sum(logits(QWEN, attach(params, a, LORA), ids)))(trained)
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


# ----------------------------------------------------------------------------- the GRPO step


@functools.partial(jax.jit, static_argnames=("lora",))
def _lora_loss_and_grads(adapters, base, batch, lora):
    return loss_and_grads(
        QWEN, adapters, base, batch, micro_batch_size=4, temperature=TEMP, loss_settings=KL, lora=lora
    )


@jax.jit
def _full_loss_and_grads(params, ref, batch):
    return loss_and_grads(QWEN, params, ref, batch, micro_batch_size=4, temperature=TEMP, loss_settings=KL)


def test_zero_adapters_equal_the_full_model_with_a_frozen_reference_copy():
    """The reference is the base itself with the adapters off: with B = 0 the policy is the base,
    so loss and every metric equal the full-parameter path whose reference is a frozen copy,
    exactly; and each B's gradient is the chain rule through that weight's full gradient."""
    base = init_params(QWEN, jax.random.key(0))
    batch = make_batch()
    adapters = init_adapters(QWEN, LORA, jax.random.key(1))
    loss, grads, metrics = _lora_loss_and_grads(adapters, base, batch, LORA)
    want_loss, want_grads, want_metrics = _full_loss_and_grads(base, jax.tree.map(jnp.copy, base), batch)
    assert float(want_metrics["clip_frac"]) > 0
    assert float(loss) == float(want_loss)
    assert {k: float(v) for k, v in metrics.items()} == {k: float(v) for k, v in want_metrics.items()}
    for leaf, g in grads["layers"].items():
        a, scale = adapters["layers"][leaf]["a"], LORA.scale
        want_b = scale * jnp.einsum("lir,lio->lro", a, want_grads["layers"][leaf])
        np.testing.assert_allclose(g["b"], want_b, rtol=1e-4, atol=1e-7, err_msg=leaf)
        assert not np.any(np.asarray(g["a"]))  # dL/dA = dL/dW @ (scale B)^T = 0 while B = 0


def test_trained_adapters_give_a_real_kl_to_the_base():
    base = init_params(QWEN, jax.random.key(0))
    _, _, m = _lora_loss_and_grads(trained_adapters(QWEN, seed=3), base, make_batch(), LORA)
    _, _, m0 = _lora_loss_and_grads(init_adapters(QWEN, LORA, jax.random.key(3)), base, make_batch(), LORA)
    assert float(m["kl"]) > 1e-3 and float(m0["kl"]) == 0.0


# ----------------------------------------------------------------------------- the sampler


def greedy_unmerged(config, params, prompts, new_tokens):
    """Greedy decoding by full forwards of the base with the adapters attached (no cache, no
    merge): one fixed-width buffer, the next token read at each row's last real position."""
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width + new_tokens), np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) : width], mask[i, width - len(p) : width] = p, 1
    for t in range(new_tokens):
        out = np.asarray(logits(config, params, jnp.asarray(ids), jnp.asarray(mask)))
        ids[:, width + t] = out[:, width + t - 1].argmax(-1)
        mask[:, width + t] = 1
    return ids[:, width:]


def test_the_sampler_on_merged_weights_equals_the_unmerged_greedy_forward():
    config = QWEN.replace(vocab_size=128)
    base = spread(init_params(config, jax.random.key(0)))
    adapters = trained_adapters(config)
    prompts = [[5, 17, 99, 3, 42], [7, 8, 9, 10, 11, 12, 13], [100]]
    want = greedy_unmerged(config, attach(base, adapters, LORA), prompts, 12)
    assert not np.array_equal(want, greedy_unmerged(config, base, prompts, 12))  # the adapters change the text
    rollout_weights = merged_params(config, base, adapters, LORA)
    out = sample(
        config, rollout_weights, prompts, num_samples=1, max_new_tokens=12, temperature=0.0, rng=jax.random.key(0)
    )
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    with pytest.raises(ValueError, match="params carry LoRA adapters"):
        sample(
            config,
            attach(base, adapters, LORA),
            prompts,
            num_samples=1,
            max_new_tokens=2,
            temperature=0.0,
            rng=jax.random.key(0),
        )


# ----------------------------------------------------------------------------- 8 devices


def test_lora_step_on_8_devices_equals_1_device_with_adapters_sharded_like_their_base():
    assert jax.device_count() == 8
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sh = adapter_sharding(QWEN, LORA, mesh, TRAIN_RULES)["layers"]
    P_ = jax.sharding.PartitionSpec
    assert sh["q_proj"]["a"].spec == P_(None, "fsdp", None) and sh["q_proj"]["b"].spec == P_(None, None, "tensor")
    assert sh["o_proj"]["a"].spec == P_(None, "tensor", None) and sh["o_proj"]["b"].spec == P_(None, None, "fsdp")
    assert sh["down_proj"]["a"].spec == P_(None, "tensor", None)
    assert abstract_adapters(QWEN, LORA, mesh, TRAIN_RULES)["layers"]["up_proj"]["b"].sharding == sh["up_proj"]["b"]

    base = init_params(QWEN, jax.random.key(0))
    adapters = init_adapters(QWEN, LORA, jax.random.key(1))
    opt = make_optimizer(OptimizerSettings(1e-2))
    kw = dict(micro_batch_size=4, temperature=TEMP, loss_settings=KL, lora=LORA)
    state1 = init_train_state(adapters, opt)
    state8 = init_train_state(adapters, opt, model_config=QWEN, mesh=mesh, lora=LORA)
    step1, step8 = make_grpo_step(QWEN, opt, **kw), make_grpo_step(QWEN, opt, mesh=mesh, **kw)
    base8 = shard_params(base, QWEN, mesh, TRAIN_RULES)
    for seed in (0, 1):  # two steps: the second moves A too, and uses the Adam moments
        state1, m1 = step1(state1, base, make_batch(seed))
        state8, m8 = step8(state8, base8, shard_batch(make_batch(seed), mesh, micro_batch_size=4))
    assert jax.tree.structure(state1.opt_state[1][0].mu) == jax.tree.structure(adapters)  # adapters only
    assert np.abs(np.asarray(state1.params["layers"]["o_proj"]["b"])).max() > 1e-3  # B moved off zero
    with pytest.raises(ValueError, match="LoRA needs the frozen base"):
        step1(state1, None, make_batch())
    assert state8.params["layers"]["q_proj"]["a"].sharding.spec == P_(None, "fsdp", None)
    assert state8.opt_state[1][0].mu["layers"]["q_proj"]["b"].sharding.spec == P_(None, None, "tensor")
    for k in ("loss", "kl", "grad_norm"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, err_msg=k)
    for x, y in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    merged = merged_params(QWEN, base8, state8.params, LORA, mesh=mesh, rules=SAMPLE_RULES)
    assert merged["layers"]["q_proj"].sharding.spec == P_(None, None, "tensor")
    np.testing.assert_allclose(
        np.asarray(merged["layers"]["q_proj"]),
        np.asarray(merge(base, state1.params, LORA)["layers"]["q_proj"]),
        atol=1e-5,
    )
