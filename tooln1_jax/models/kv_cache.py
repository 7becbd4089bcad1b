"""A fixed-size KV cache: every layer's keys and values, plus a slot mask and the next slot.

The buffers are stacked [L, ...] arrays, so a forward can run its layers under one `lax.scan`
(compile time bounded in depth) with the buffers in the scan's carry: a layer writes only its
new slots (`write_key_slots` / `write_value_slots` at its layer index, in place), never the
whole cache.

Every row writes at the same slot `index` (batches are left-padded); `mask` marks which
slots hold real tokens, so padding is never attended to and positions count real tokens.

Written by `transformer.forward_cached` (prefill) and `group_decode.group_decode_step` (decode).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tooln1_jax.models.model_config import ModelConfig
from tooln1_jax.sharding import ShardingRules, logical_to_spec

# Heads before slots, so each (row, kv head) is one contiguous block and decode attention is a
# plain batched matmul: keys [head_dim, slots] (q @ K), values [slots, head_dim] (p @ V).
KEY_CACHE_LOGICAL_AXES = ("batch", "kv_heads_cache", "head_dim", "cache_seq")
VALUE_CACHE_LOGICAL_AXES = ("batch", "kv_heads_cache", "cache_seq", "head_dim")


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [num_layers, batch, kv_heads, head_dim, max_len]
    v: jax.Array  # [num_layers, batch, kv_heads, max_len, head_dim]
    mask: jax.Array  # [batch, max_len] int32, 1 where the slot holds a real token
    index: jax.Array  # [] int32, the next slot to write

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    k_shape = (config.num_layers, batch, config.num_kv_heads, config.head_dim, max_len)
    return KVCache(
        k=jnp.zeros(k_shape, dtype),
        v=jnp.zeros(shape, dtype),
        mask=jnp.zeros((batch, max_len), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def grow_cache(cache: KVCache, max_len: int) -> KVCache:
    """The same cache with room for `max_len` slots (the new ones empty: zeros, mask 0)."""
    extra = max_len - cache.max_len
    pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
    return KVCache(
        k=pad(cache.k, 4),
        v=pad(cache.v, 3),
        mask=pad(cache.mask, 1),
        index=cache.index,
    )


def cache_sharding(cache: KVCache, mesh: Mesh, rules: ShardingRules) -> KVCache:
    """A `KVCache` (or its `jax.eval_shape`) -> the same KVCache structure of `NamedSharding`:
    keys by ("layers", *KEY_CACHE_LOGICAL_AXES), values by ("layers", *VALUE_CACHE_LOGICAL_AXES),
    the mask as [batch, cache_seq], the index replicated."""

    def buf(axes, x):
        return NamedSharding(mesh, logical_to_spec(("layers", *axes), mesh, rules, x.shape))

    return cache.replace(
        k=buf(KEY_CACHE_LOGICAL_AXES, cache.k),
        v=buf(VALUE_CACHE_LOGICAL_AXES, cache.v),
        mask=NamedSharding(mesh, logical_to_spec(("batch", "cache_seq"), mesh, rules, cache.mask.shape)),
        index=NamedSharding(mesh, PartitionSpec()),
    )


def write_key_slots(buf: jax.Array, new: jax.Array, layer, start) -> jax.Array:
    """Writes keys new [B, T, K, hd] at slots start ... start+T-1 of layer `layer` of a stacked key
    buffer [L, B, K, hd, S]."""
    new = new.transpose(0, 2, 3, 1)[None].astype(buf.dtype)
    return jax.lax.dynamic_update_slice(buf, new, (layer, 0, 0, 0, start))


def write_value_slots(buf: jax.Array, new: jax.Array, layer, start) -> jax.Array:
    """Writes values new [B, T, K, hd] at slots start ... start+T-1 of layer `layer` of a stacked
    value buffer [L, B, K, S, hd]."""
    new = jnp.swapaxes(new, 1, 2)[None].astype(buf.dtype)
    return jax.lax.dynamic_update_slice(buf, new, (layer, 0, 0, start, 0))
