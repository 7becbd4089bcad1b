"""The Qwen2.5 / Llama decoder as pure functions of a params pytree (its leaves: `params.PARAM_SPECS`).

The full forward (`hidden_states`, `logits`) runs the stacked layers under one `lax.scan`, so
compile time does not grow with depth. The cached forward (`forward_cached`) runs them as an
unrolled Python loop, because the `KVCache` holds one buffer per layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tooln1_jax.models.attention import attention
from tooln1_jax.models.kv_cache import KVCache, write_key_slots, write_value_slots
from tooln1_jax.models.layers import apply_rope, rms_norm, rope_at_positions
from tooln1_jax.models.lora import ADAPTER_KEY
from tooln1_jax.models.model_config import ModelConfig


def lm_head_weight(params: dict) -> jax.Array:
    """[embed, vocab]: the output projection (the transposed embedding when tied)."""
    return params["lm_head"] if "lm_head" in params else params["embed"].T


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T] 0/1 -> [B, T] positions counting real tokens only (left padding gets 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def dense(x: jax.Array, lp: dict, name: str) -> jax.Array:
    """x [..., in] @ lp[name] [in, out] in x's dtype, plus (x @ a) @ b when the layer carries a
    LoRA adapter for `name` (`lora.attach`: b already scaled): the low-rank path, not a merged
    weight, so its gradient is the adapters' alone."""
    dt = x.dtype
    y = x @ lp[name].astype(dt)
    adapter = lp.get(ADAPTER_KEY, {}).get(name)
    if adapter is not None:
        y = y + (x @ adapter["a"].astype(dt)) @ adapter["b"].astype(dt)
    return y


def project_qkv(config: ModelConfig, lp: dict, x: jax.Array, sin: jax.Array, cos: jax.Array):
    """x [B, T, D] (normed) -> q [B, T, H, hd], k and v [B, T, K, hd], rotary applied to q and k."""
    c = config
    dt = x.dtype
    q, k, v = dense(x, lp, "q_proj"), dense(x, lp, "k_proj"), dense(x, lp, "v_proj")
    if c.attention_bias:
        q, k, v = q + lp["q_bias"].astype(dt), k + lp["k_bias"].astype(dt), v + lp["v_bias"].astype(dt)
    b, t, _ = x.shape
    q = apply_rope(q.reshape(b, t, c.num_heads, c.head_dim), sin, cos)
    k = apply_rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), sin, cos)
    return q, k, v.reshape(b, t, c.num_kv_heads, c.head_dim)


def attention_out_and_mlp(config: ModelConfig, lp: dict, x: jax.Array, attn: jax.Array) -> jax.Array:
    """Residual adds: x [B, T, D] + o_proj(attn), then + the SwiGLU MLP of its norm,
    down(silu(gate(h)) * up(h))."""
    x = x + dense(attn, lp, "o_proj")
    h = rms_norm(x, lp["post_attn_norm"], config.rms_norm_eps)
    return x + dense(jax.nn.silu(dense(h, lp, "gate_proj")) * dense(h, lp, "up_proj"), lp, "down_proj")


def decoder_layer(config, lp, x, sin, cos, attention_mask):
    """One layer without a cache. x [B, T, D], attention_mask [B, T] (1 real, 0 pad): causal
    attention over the real tokens, by `config.attention_impl`."""
    h = rms_norm(x, lp["input_norm"], config.rms_norm_eps)
    q, k, v = project_qkv(config, lp, h, sin, cos)
    return attention_out_and_mlp(config, lp, x, attention(config.attention_impl, q, k, v, attention_mask))


def hidden_states(
    config: ModelConfig, params: dict, input_ids: jax.Array, attention_mask: jax.Array | None = None
) -> jax.Array:
    """Full forward with no cache. input_ids [B, T], attention_mask [B, T] (1 real, 0 pad,
    left padding allowed) -> final-normed hidden states [B, T, D] in the compute dtype."""
    dt = jnp.dtype(config.dtype)
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
    sin, cos = rope_at_positions(positions_from_mask(attention_mask), config.head_dim, config.rope_theta)
    x = params["embed"][input_ids].astype(dt)

    def body(x, lp):
        return decoder_layer(config, lp, x, sin, cos, attention_mask), None

    if config.remat == "full":
        body = jax.checkpoint(body)
    elif config.remat == "dots":
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    x, _ = jax.lax.scan(body, x, params["layers"])
    return rms_norm(x, params["final_norm"], config.rms_norm_eps)


@functools.partial(jax.jit, static_argnums=0)
def logits(
    config: ModelConfig, params: dict, input_ids: jax.Array, attention_mask: jax.Array | None = None
) -> jax.Array:
    """input_ids [B, T] -> logits [B, T, vocab] float32 (full forward, no cache)."""
    h = hidden_states(config, params, input_ids, attention_mask)
    return (h @ lm_head_weight(params).astype(h.dtype)).astype(jnp.float32)


def forward_cached(
    config: ModelConfig, params: dict, tokens: jax.Array, token_mask: jax.Array, cache: KVCache, last_only: bool = False
):
    """Runs `tokens` [B, T] (token_mask [B, T], 1 real / 0 pad) through the model, appending them
    to the cache at slots index ... index+T-1. Returns (hidden [B, T, D] final-normed, new cache).

    `last_only` (a prefill that needs only the next token's logits) returns hidden [B, 1, D] for
    the last position: the last layer still writes every position's keys and values, but runs
    attention, o_proj and the MLP for that one position (about 10% of a W1 prefill's FLOPs)."""
    dt = jnp.dtype(config.dtype)
    b, t = tokens.shape
    start = cache.index
    # Position of each new token = real tokens before it in this row.
    positions = jnp.sum(cache.mask, axis=1, keepdims=True) + jnp.cumsum(token_mask, axis=1) - 1
    sin, cos = rope_at_positions(jnp.maximum(positions, 0), config.head_dim, config.rope_theta)
    new_mask = jax.lax.dynamic_update_slice(cache.mask, token_mask.astype(jnp.int32), (0, start))
    query_start = start  # token t at cache slot start + t; its keys: every valid slot up to it

    x = params["embed"][tokens].astype(dt)
    ks, vs = [], []
    for i in range(config.num_layers):
        lp = jax.tree.map(lambda a, i=i: a[i], params["layers"])
        h = rms_norm(x, lp["input_norm"], config.rms_norm_eps)
        q, k, v = project_qkv(config, lp, h, sin, cos)
        k_buf = write_key_slots(cache.k[i], k, start)
        v_buf = write_value_slots(cache.v[i], v, start)
        if last_only and i == config.num_layers - 1:
            x, q, query_start = x[:, -1:], q[:, -1:], start + t - 1
        # [B, S, K, hd] for the prefill attention: one transpose per prefill, not per token
        keys, values = k_buf.transpose(0, 3, 1, 2).astype(dt), jnp.swapaxes(v_buf, 1, 2).astype(dt)
        attn = attention(config.attention_impl, q, keys, values, new_mask, query_start)
        x = attention_out_and_mlp(config, lp, x, attn)
        ks.append(k_buf)
        vs.append(v_buf)
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    return x, KVCache(k=tuple(ks), v=tuple(vs), mask=new_mask, index=start + t)
