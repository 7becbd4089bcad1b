"""The Qwen2.5 / Llama decoder as pure functions of a params pytree.

Params are a plain nested dict. Per-layer weights are stacked on a leading `layers`
axis so the full forward runs the layers under one `lax.scan` (compile time does not
grow with depth):

    embed        [vocab, embed]
    layers/      input_norm [L, D]; q_proj [L, D, H*hd]; q_bias [L, H*hd];
                 k_proj, v_proj [L, D, K*hd]; k_bias, v_bias [L, K*hd]; o_proj [L, H*hd, D];
                 post_attn_norm [L, D]; gate_proj, up_proj [L, D, F]; down_proj [L, F, D]
    final_norm   [D]
    lm_head      [D, vocab]   (absent when embeddings are tied)

Biases exist only when `config.attention_bias` (Qwen2). Weights are stored as
[in, out], the transpose of torch's nn.Linear.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax.sharding import Mesh

from tooln1_jax.models.model_config import ModelConfig
from tooln1_jax.sharding import ShardingRules, logical_to_sharding
from tooln1_jax.models.layers import apply_rope, attention, rms_norm, rope_tables, swiglu_mlp

# Logical axis names of each parameter; sharding.py maps them onto mesh axes.
_LAYER_AXES = {
    "input_norm": ("layers", "norm"),
    "q_proj": ("layers", "embed", "q_heads"),
    "q_bias": ("layers", "q_heads"),
    "k_proj": ("layers", "embed", "kv_heads"),
    "k_bias": ("layers", "kv_heads"),
    "v_proj": ("layers", "embed", "kv_heads"),
    "v_bias": ("layers", "kv_heads"),
    "o_proj": ("layers", "q_heads", "embed"),
    "post_attn_norm": ("layers", "norm"),
    "gate_proj": ("layers", "embed", "mlp"),
    "up_proj": ("layers", "embed", "mlp"),
    "down_proj": ("layers", "mlp", "embed"),
}


def param_shapes(config: ModelConfig) -> dict:
    """The params pytree's structure as {name: shape}."""
    c = config
    d, f, L = c.hidden_size, c.intermediate_size, c.num_layers
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layers = {
        "input_norm": (L, d), "q_proj": (L, d, q), "k_proj": (L, d, kv), "v_proj": (L, d, kv),
        "o_proj": (L, q, d), "post_attn_norm": (L, d),
        "gate_proj": (L, d, f), "up_proj": (L, d, f), "down_proj": (L, f, d),
    }
    if c.attention_bias:
        layers.update(q_bias=(L, q), k_bias=(L, kv), v_bias=(L, kv))
    shapes = {"embed": (c.vocab_size, d), "layers": layers, "final_norm": (d,)}
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (d, c.vocab_size)
    return shapes


def param_logical_axes(config: ModelConfig) -> dict:
    """Same tree as the params, with a tuple of logical axis names at each leaf."""
    shapes = param_shapes(config)
    axes = {
        "embed": ("vocab", "embed"),
        "layers": {k: _LAYER_AXES[k] for k in shapes["layers"]},
        "final_norm": ("norm",),
    }
    if "lm_head" in shapes:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_sharding(config: ModelConfig, mesh: Mesh, rules: ShardingRules) -> dict:
    """The params tree of `NamedSharding` for a `ModelConfig` (usable as jit in/out_shardings)."""
    return logical_to_sharding(param_logical_axes(config), mesh, rules, param_shapes(config))


def shard_params(params: dict, config: ModelConfig, mesh: Mesh, rules: ShardingRules) -> dict:
    """Moves (or reshards) a params tree onto the mesh under `rules`."""
    return jax.device_put(params, param_sharding(config, mesh, rules))


def abstract_params(config: ModelConfig, mesh: Mesh, dtype, rules: ShardingRules) -> dict:
    """The params tree as `jax.ShapeDtypeStruct`s placed by `rules` (a restore target; no arrays made)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, jnp.dtype(dtype), sharding=sh),
                        param_shapes(config), param_sharding(config, mesh, rules),
                        is_leaf=lambda x: isinstance(x, tuple))


def init_params(config: ModelConfig, rng: jax.Array, dtype=jnp.float32) -> dict:
    """Random params: normal(0, 0.02) weights, zero biases, unit norms."""
    shapes = param_shapes(config)
    flat, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(rng, len(flat))
    leaves = []
    for (path, shape), key in zip(flat, keys):
        name = path[-1].key
        if name.endswith("norm"):
            leaves.append(jnp.ones(shape, dtype))
        elif name.endswith("bias"):
            leaves.append(jnp.zeros(shape, dtype))
        else:
            leaves.append((0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, leaves)


def lm_head_weight(params: dict) -> jax.Array:
    """[embed, vocab]: the output projection (the transposed embedding when tied)."""
    return params["lm_head"] if "lm_head" in params else params["embed"].T


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T] 0/1 -> [B, T] positions counting real tokens only (left padding gets 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def project_qkv(config: ModelConfig, lp: dict, x: jax.Array, sin: jax.Array, cos: jax.Array):
    """x [B, T, D] (normed) -> q [B, T, H, hd], k and v [B, T, K, hd], rotary applied to q and k."""
    c = config
    dt = x.dtype
    q, k, v = x @ lp["q_proj"].astype(dt), x @ lp["k_proj"].astype(dt), x @ lp["v_proj"].astype(dt)
    if c.attention_bias:
        q, k, v = q + lp["q_bias"].astype(dt), k + lp["k_bias"].astype(dt), v + lp["v_bias"].astype(dt)
    b, t, _ = x.shape
    q = apply_rope(q.reshape(b, t, c.num_heads, c.head_dim), sin, cos)
    k = apply_rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), sin, cos)
    return q, k, v.reshape(b, t, c.num_kv_heads, c.head_dim)


def attention_out_and_mlp(config: ModelConfig, lp: dict, x: jax.Array, attn: jax.Array) -> jax.Array:
    """Residual adds: x [B, T, D] + o_proj(attn), then + SwiGLU MLP of its norm."""
    dt = x.dtype
    x = x + attn @ lp["o_proj"].astype(dt)
    h = rms_norm(x, lp["post_attn_norm"], config.rms_norm_eps)
    return x + swiglu_mlp(h, lp["gate_proj"].astype(dt), lp["up_proj"].astype(dt), lp["down_proj"].astype(dt))


def decoder_layer(config, lp, x, sin, cos, mask):
    """One layer without a cache. x [B, T, D], mask [B, T, T] bool."""
    h = rms_norm(x, lp["input_norm"], config.rms_norm_eps)
    q, k, v = project_qkv(config, lp, h, sin, cos)
    return attention_out_and_mlp(config, lp, x, attention(q, k, v, mask))


def hidden_states(config: ModelConfig, params: dict, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Full forward with no cache. input_ids [B, T], attention_mask [B, T] (1 real, 0 pad,
    left padding allowed) -> final-normed hidden states [B, T, D] in the compute dtype."""
    dt = jnp.dtype(config.dtype)
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
    sin, cos = rope_tables(positions_from_mask(attention_mask), config.head_dim, config.rope_theta)
    causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
    mask = causal[None] & (attention_mask[:, None, :] > 0)
    x = params["embed"][input_ids].astype(dt)

    def body(x, lp):
        return decoder_layer(config, lp, x, sin, cos, mask), None

    if config.remat == "full":
        body = jax.checkpoint(body)
    elif config.remat == "dots":
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    x, _ = jax.lax.scan(body, x, params["layers"])
    return rms_norm(x, params["final_norm"], config.rms_norm_eps)


@functools.partial(jax.jit, static_argnums=0)
def logits(config: ModelConfig, params: dict, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """input_ids [B, T] -> logits [B, T, vocab] float32 (full forward, no cache)."""
    h = hidden_states(config, params, input_ids, attention_mask)
    return (h @ lm_head_weight(params).astype(h.dtype)).astype(jnp.float32)
