"""A fixed-size KV cache: per layer a key and a value buffer, plus a slot mask and the next slot.

The buffers are a tuple, one per layer, not one stacked [L, ...] array, so a step writes only
its new slots (`dynamic_update_slice`) instead of rewriting the whole cache.

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
    k: tuple  # num_layers x [batch, kv_heads, head_dim, max_len]
    v: tuple  # num_layers x [batch, kv_heads, max_len, head_dim]
    mask: jax.Array  # [batch, max_len] int32, 1 where the slot holds a real token
    index: jax.Array  # [] int32, the next slot to write

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    k_shape = (batch, config.num_kv_heads, config.head_dim, max_len)
    return KVCache(
        k=tuple(jnp.zeros(k_shape, dtype) for _ in range(config.num_layers)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        mask=jnp.zeros((batch, max_len), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def grow_cache(cache: KVCache, max_len: int) -> KVCache:
    """The same cache with room for `max_len` slots (the new ones empty: zeros, mask 0)."""
    extra = max_len - cache.max_len
    pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
    return KVCache(
        k=tuple(pad(k, 3) for k in cache.k),
        v=tuple(pad(v, 2) for v in cache.v),
        mask=pad(cache.mask, 1),
        index=cache.index,
    )


def cache_sharding(cache: KVCache, mesh: Mesh, rules: ShardingRules) -> KVCache:
    """A `KVCache` (or its `jax.eval_shape`) -> the same KVCache structure of `NamedSharding`:
    keys by `KEY_CACHE_LOGICAL_AXES`, values by `VALUE_CACHE_LOGICAL_AXES`, the mask as
    [batch, cache_seq], the index replicated."""

    def buf(axes):
        return lambda x: NamedSharding(mesh, logical_to_spec(axes, mesh, rules, x.shape))

    return cache.replace(
        k=tuple(map(buf(KEY_CACHE_LOGICAL_AXES), cache.k)),
        v=tuple(map(buf(VALUE_CACHE_LOGICAL_AXES), cache.v)),
        mask=NamedSharding(mesh, logical_to_spec(("batch", "cache_seq"), mesh, rules, cache.mask.shape)),
        index=NamedSharding(mesh, PartitionSpec()),
    )


def write_key_slots(buf: jax.Array, new: jax.Array, start) -> jax.Array:
    """Writes keys new [B, T, K, hd] at slots start ... start+T-1 of a key buffer [B, K, hd, S]."""
    return jax.lax.dynamic_update_slice(buf, new.transpose(0, 2, 3, 1).astype(buf.dtype), (0, 0, 0, start))


def write_value_slots(buf: jax.Array, new: jax.Array, start) -> jax.Array:
    """Writes values new [B, T, K, hd] at slots start ... start+T-1 of a value buffer [B, K, S, hd]."""
    return jax.lax.dynamic_update_slice(buf, jnp.swapaxes(new, 1, 2).astype(buf.dtype), (0, 0, start, 0))
