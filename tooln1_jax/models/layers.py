"""The decoder's maths as pure functions: RMSNorm, rotary embeddings (GQA attention is
`attention.py`; the SwiGLU MLP is `transformer.attention_out_and_mlp`, built from `transformer.dense`).

Everything here follows transformers' Qwen2/Llama numerics: norms and softmax in float32,
rotary tables in float32, everything else in the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., D], weight [D] -> [..., D] in x.dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_at_positions(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] int -> (sin, cos), each [B, T, head_dim // 2] float32: computed for the
    given positions (`group_decode.rope_lookup_table` tabulates positions 0 ... length-1 instead)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """x [B, T, N, head_dim] rotated by the half-split (rotate_half) convention of HF."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
