"""The attention implementations (models/attention.py) against the dense reference: values and
gradients, the full model, memory growth with sequence length, the "auto" choice, the config."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tooln1_jax.config import ConfigError, default_config, validate_config
from tooln1_jax.models import ModelConfig, forward_cached, init_cache, init_params, logits
from tooln1_jax.models import attention as attn

IMPLS = {
    "blockwise": functools.partial(attn.blockwise_attention, block=16),  # 16: T, S not multiples
    "cudnn": functools.partial(attn.cudnn_attention, implementation="xla"),  # the same call, on CPU
    "splash": attn.splash_attention,  # Pallas interpret mode on CPU
}
# (T queries, S key slots, query_start): training (queries are the keys) and a cached prefill.
LAYOUTS = {"training": (37, 37, 0), "prefill": (20, 48, 9)}


def _inputs(t, s, start, seed=0):
    """GQA (H = 2K) inputs; key_valid with left padding (row 1) and a row whose queries are all
    padding (row 2); in the prefill layout, slots past the new tokens are unwritten (invalid)."""
    ks = jax.random.split(jax.random.key(seed), 4)
    b, h, kv, hd = 3, 4, 2, 8
    q = jax.random.normal(ks[0], (b, t, h, hd))
    k, v = (jax.random.normal(key, (b, s, kv, hd)) for key in ks[1:3])
    valid = np.zeros((b, s), np.int32)
    valid[:, : start + t] = 1
    valid[1, : start + 5] = 0
    valid[2, start : start + t] = 0
    return q, k, v, jnp.asarray(valid), jax.random.normal(ks[3], (b, t, h * hd))


def _real_rows(valid, t, start):
    return valid[:, start : start + t, None]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", IMPLS)
def test_each_impl_equals_dense_in_values_and_gradients(impl, layout):
    t, s, start = LAYOUTS[layout]
    q, k, v, valid, w = _inputs(t, s, start)
    real = _real_rows(valid, t, start)
    mask = attn.causal_mask(valid, start, t)

    # A loss over the real tokens, as the model's losses are; blockwise equals dense on every row.
    weight = w if impl == "blockwise" else w * real

    def value_and_grads(f):
        return f(q, k, v), jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v) * weight), (0, 1, 2))(q, k, v)

    dense = functools.partial(attn.dense_attention, mask=mask)
    other = functools.partial(IMPLS[impl], key_valid=valid, query_start=start)
    both = jax.jit(lambda: (value_and_grads(dense), value_and_grads(other)))  # one compile
    (ref, (ref_loss, ref_grads)), (out, (val, grads)) = jax.tree.map(np.asarray, both())
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out * real, ref * real, atol=1e-5)
    if impl == "blockwise":  # every row, fully padded ones included
        np.testing.assert_allclose(out, ref, atol=1e-5)
    else:  # rows whose own slot is padding are zeros
        np.testing.assert_array_equal(out * (1 - real), 0)
    np.testing.assert_allclose(val, ref_loss, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, atol=1e-5)


QWEN = ModelConfig(
    vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8
)
LLAMA = ModelConfig(
    vocab_size=53,
    hidden_size=32,
    intermediate_size=40,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    attention_bias=False,
    model_type="llama",
    tie_word_embeddings=False,
)


PREFILL = jax.jit(forward_cached, static_argnums=0)


@pytest.mark.parametrize(
    "config,impl",
    [(QWEN, "blockwise"), (QWEN, "cudnn"), (QWEN, "splash"), (LLAMA, "blockwise")],
    ids=["qwen2-tied-blockwise", "qwen2-tied-cudnn", "qwen2-tied-splash", "llama-untied-blockwise"],
)
def test_model_logits_and_cached_prefill_equal_dense(config, impl, monkeypatch):
    monkeypatch.setattr(attn, "BLOCK", 8)  # several key blocks at 13 tokens
    monkeypatch.setattr(attn, "cudnn_attention", functools.partial(IMPLS["cudnn"].func, implementation="xla"))
    params = init_params(config, jax.random.key(1))
    ids = jax.random.randint(jax.random.key(2), (3, 13), 0, config.vocab_size)
    mask = jnp.ones((3, 13), jnp.int32).at[1, :4].set(0).at[2, :11].set(0)
    real = np.asarray(mask, bool)
    dense, other = config.replace(attention_impl="dense"), config.replace(attention_impl=impl)
    ref, out = np.asarray(logits(dense, params, ids, mask)), np.asarray(logits(other, params, ids, mask))
    np.testing.assert_allclose(out[real], ref[real], atol=1e-5)
    # A prefill of the last 6 tokens against a cache holding the first 7 (query_start 7).
    hidden = []
    for c in (dense, other):
        _, cache = PREFILL(c, params, ids[:, :7], mask[:, :7], init_cache(c, 3, 16))
        hidden.append(np.asarray(PREFILL(c, params, ids[:, 7:], mask[:, 7:], cache)[0]))
    np.testing.assert_allclose(hidden[1][real[:, 7:]], hidden[0][real[:, 7:]], atol=1e-5)


def _train_temp_bytes(impl: str, t: int) -> int:
    """XLA's temp bytes of value-and-grad of a sum-of-outputs loss of one attention at T tokens."""
    q = jax.ShapeDtypeStruct((1, t, 2, 8), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, 1, 8), jnp.float32)
    valid = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def loss(q, k, v, valid):
        return jnp.sum(attn.attention(impl, q, k, v, valid))

    step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    return step.lower(q, kv, kv, valid).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly_and_dense_quadratically():
    dense = [_train_temp_bytes("dense", t) for t in (2048, 4096, 8192)]
    blockwise = [_train_temp_bytes("blockwise", t) for t in (2048, 4096, 8192)]
    print("temp bytes at 2048/4096/8192: dense", dense, "blockwise", blockwise)
    assert dense[2] / dense[1] > 3 and dense[1] / dense[0] > 3
    assert blockwise[2] / blockwise[1] < 2.5 and blockwise[1] / blockwise[0] < 2.5
    assert blockwise[2] < dense[2] / 10


def test_cudnn_branch_passes_cudnn(monkeypatch):
    seen, call = [], jax.nn.dot_product_attention

    def record(*args, implementation=None, **kwargs):
        seen.append(implementation)
        return call(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(attn.jax.nn, "dot_product_attention", record)
    q, k, v, valid, _ = _inputs(*LAYOUTS["training"])
    attn.attention("cudnn", q, k, v, valid)
    assert seen == ["cudnn"]


def test_auto_resolves_per_backend():
    long, short = attn.BLOCK + 1, attn.BLOCK
    assert attn.resolve("auto", jnp.bfloat16, short, backend="tpu") == "splash"
    assert attn.resolve("auto", jnp.bfloat16, long, backend="gpu", gpu_capability=9.0) == "cudnn"
    assert attn.resolve("auto", jnp.float16, long, backend="gpu", gpu_capability=7.5) == "blockwise"  # a T4
    assert (
        attn.resolve("auto", jnp.float32, long, backend="gpu", gpu_capability=9.0) == "blockwise"
    )  # cuDNN flash: no float32
    assert attn.resolve("auto", jnp.float32, long, backend="cpu") == "blockwise"
    assert attn.resolve("auto", jnp.float32, short, backend="cpu") == "dense"  # one block saves nothing
    assert attn.resolve("dense", jnp.bfloat16, long, backend="tpu") == "dense"


def test_unknown_impl_is_rejected_naming_the_field():
    config = default_config()
    config.model.attention_impl = "flash"
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    assert "config.model.attention_impl='flash' is not one of" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        ModelConfig(
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            head_dim=8,
            attention_impl="flash",
        )
