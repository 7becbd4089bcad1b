"""The one-token forward of group sampling, laid out for speed on a fixed-size KV cache.

R = B * n rows continue B prompts, n rows each. The n rows of a group read their prompt's
prefilled cache in place (shared, never copied n times) and write their own tokens into a
continuation cache of R rows. Everything a decode loop can hoist is built once, outside it:
the weights, sliced per layer, fused and transposed (`decode_weights`), and the rotary tables
(`rope_lookup_table`). Numerically this is the same model as `transformer.py` (the
sampler's tests compare it with transformers and with the full forward).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from tooln1_jax.models.kv_cache import KVCache, write_key_slots, write_value_slots
from tooln1_jax.models.layers import apply_rope, rope_at_positions
from tooln1_jax.models.model_config import ModelConfig


@flax.struct.dataclass
class DecodeWeights:
    """The weights one decode step reads, laid out for it. Every matrix is [out, in] (torch's
    nn.Linear layout), because the step keeps its activations feature-major, [D, R]."""

    embed: jax.Array  # [V, D]
    layers: tuple  # per layer: qkv [K*(g+2)*hd, D], qkv_bias [K*(g+2)*hd], o_proj [D, H*hd],
    #                gate_up [2F, D], down_proj [D, F], input_norm and post_attn_norm [D]
    final_norm: jax.Array  # [D]
    head: jax.Array  # [V, D]: the output projection's rows (the embedding itself when tied)


def decode_weights(config: ModelConfig, params: dict) -> DecodeWeights:
    """The params laid out for one-token decoding. Build once, outside a decode loop: it copies
    the layer weights once, in the compute dtype (with fp32 master weights and bf16 compute
    that is half the master's bytes, and no step re-casts a weight).

    Three layout choices for a step whose matmuls have few rows (R), each faster on CPU
    (docs/performance_history.md):
    - q/k/v are one matmul and gate/up another, fused per shard-aligned block so
      tensor-parallel shards stay local: per kv head its g query heads, then its key, then its
      value; gate and up rows interleaved;
    - weights are [out, in] and activations [D, R], so a step computes `W @ x`;
    - one slice per layer, so the loop body reads each layer's weights directly."""
    c = config
    g = c.num_heads // c.num_kv_heads
    dt = jnp.dtype(c.dtype)

    def one(lp):
        by_kv_head = lambda w, width: w.reshape(*w.shape[:-1], c.num_kv_heads, width)
        q, k, v = (
            by_kv_head(lp["q_proj"], g * c.head_dim),
            by_kv_head(lp["k_proj"], c.head_dim),
            by_kv_head(lp["v_proj"], c.head_dim),
        )
        out = {
            "input_norm": lp["input_norm"],
            "post_attn_norm": lp["post_attn_norm"],
            "qkv": jnp.concatenate([q, k, v], axis=-1).reshape(c.hidden_size, -1).T,
            "o_proj": lp["o_proj"].T,
            "gate_up": jnp.stack([lp["gate_proj"], lp["up_proj"]], axis=-1).reshape(c.hidden_size, -1).T,
            "down_proj": lp["down_proj"].T,
        }
        if c.attention_bias:
            qb, kb, vb = (
                by_kv_head(lp["q_bias"], g * c.head_dim),
                by_kv_head(lp["k_bias"], c.head_dim),
                by_kv_head(lp["v_bias"], c.head_dim),
            )
            out["qkv_bias"] = jnp.concatenate([qb, kb, vb], axis=-1).reshape(-1)
        return out

    layers = tuple(one(jax.tree.map(lambda a, i=i: a[i].astype(dt), params["layers"])) for i in range(c.num_layers))
    head = params["embed"] if "lm_head" not in params else params["lm_head"].T
    # The barrier makes XLA materialise the transposed copies, rather than fold each transpose
    # into the dot that reads it (which brings back the slower [in, out] operand).
    layers, head = jax.lax.optimization_barrier((layers, head.astype(dt)))
    return DecodeWeights(embed=params["embed"], layers=layers, final_norm=params["final_norm"], head=head)


def _rms_norm_columns(x_t: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """`layers.rms_norm` of feature-major activations: x_t [D, R], normalised over D."""
    x32 = x_t.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=0, keepdims=True) + eps)
    return weight.astype(x_t.dtype)[:, None] * normed.astype(x_t.dtype)


def _prefix_suffix_attention(q, prefix_k, prefix_v, prefix_mask, k_suffix, v_suffix, suffix_mask):
    """Attention of R = B * n one-token queries over their group's shared prompt prefix and
    their own continuation, in one softmax.

    q [R, K, g, hd] (query heads grouped by their kv head); prefix_k [B, K, hd, P] and
    prefix_v [B, K, P, hd] (prompt b serves query rows b*n ... b*n+n-1); prefix_mask [B, P];
    k_suffix [R, K, hd, S], v_suffix [R, K, S, hd]; suffix_mask [R, S]. Returns [R, H * hd]."""
    r, kv_heads, g, hd = q.shape
    b, _, p, _ = prefix_v.shape
    n, h = r // b, kv_heads * g
    neg = jnp.finfo(jnp.float32).min
    # The n queries of a group share the prefix: one [n*g, hd] x [hd, P] matmul per (prompt, kv head).
    q_groups = q.reshape(b, n, kv_heads, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, n * g, hd)
    s_prefix = jnp.einsum("bkmd,bkdp->bkmp", q_groups, prefix_k.astype(q.dtype), preferred_element_type=jnp.float32)
    s_prefix = jnp.where(prefix_mask[:, None, None, :] > 0, s_prefix * (hd**-0.5), neg)
    s_suffix = jnp.einsum("rkgd,rkds->rkgs", q, k_suffix.astype(q.dtype), preferred_element_type=jnp.float32)
    s_suffix = jnp.where(suffix_mask[:, None, None, :] > 0, s_suffix * (hd**-0.5), neg)
    # One softmax over both parts without concatenating them: a shared max, then each part's sum.
    to_rows = lambda a: a.reshape(b, kv_heads, n, g, *a.shape[3:]).swapaxes(1, 2).reshape(r, kv_heads, g, *a.shape[3:])
    to_groups = lambda a: (
        a.reshape(b, n, kv_heads, g, *a.shape[3:]).swapaxes(1, 2).reshape(b, kv_heads, n * g, *a.shape[3:])
    )
    top = jnp.maximum(
        to_rows(jnp.max(s_prefix, axis=-1, keepdims=True)), jnp.max(s_suffix, axis=-1, keepdims=True)
    )  # [R, K, g, 1]
    e_prefix = jnp.exp(s_prefix - to_groups(top))
    e_suffix = jnp.exp(s_suffix - top)
    total = to_rows(jnp.sum(e_prefix, axis=-1, keepdims=True)) + jnp.sum(e_suffix, axis=-1, keepdims=True)
    out = to_rows(jnp.einsum("bkmp,bkpd->bkmd", e_prefix.astype(q.dtype), prefix_v.astype(q.dtype)))
    out = (out + jnp.einsum("rkgs,rksd->rkgd", e_suffix.astype(q.dtype), v_suffix.astype(q.dtype))) / total.astype(
        q.dtype
    )
    return out.reshape(r, h * hd)


def rope_lookup_table(config: ModelConfig, length: int) -> tuple[jax.Array, jax.Array]:
    """(sin, cos), each [length, head_dim // 2]: a table indexed by position, for positions
    0 ... length-1 (`layers.rope_at_positions` computes them for given positions). Built once
    outside a decode loop; inside, XLA would recompute sin and cos in every fusion that reads
    them (once per layer, and per element)."""
    sin, cos = rope_at_positions(jnp.arange(length)[None], config.head_dim, config.rope_theta)
    return sin[0], cos[0]


def group_decode_step(
    config: ModelConfig,
    weights: DecodeWeights,
    tokens: jax.Array,
    prefix: KVCache,
    cache: KVCache,
    rope: tuple[jax.Array, jax.Array],
):
    """One new token for each of R = B * n rows that continue B shared prompts.

    tokens [R] int. `prefix` is the prompts' prefilled cache ([B, P] slots, read only, never
    copied n times, so a step reads each prompt once); `cache` holds each row's own generated
    tokens ([R, S] slots), and the new token is written at its slot `cache.index`. `weights`
    from `decode_weights`; `rope` from `rope_lookup_table`, covering every position the step
    can reach.
    Returns (logits_t [V, R] float32, vocabulary-major as the sampler reads them, new cache)."""
    dt = jnp.dtype(config.dtype)
    r = tokens.shape[0]
    n = r // prefix.mask.shape[0]
    start = cache.index
    prompt_lengths = jnp.repeat(jnp.sum(prefix.mask, axis=1), n)  # [R]
    positions = (prompt_lengths + jnp.sum(cache.mask, axis=1))[:, None]  # [R, 1]
    sin, cos = rope[0][positions], rope[1][positions]  # [R, 1, hd/2]
    new_mask = jax.lax.dynamic_update_slice(cache.mask, jnp.ones((r, 1), jnp.int32), (0, start))

    g = config.num_heads // config.num_kv_heads
    eps = config.rms_norm_eps
    x_t = weights.embed[tokens].astype(dt).T  # [D, R]: feature-major (see `decode_weights`)
    ks, vs = [], []
    for i, lp in enumerate(weights.layers):
        qkv = lp["qkv"] @ _rms_norm_columns(x_t, lp["input_norm"], eps)  # [K*(g+2)*hd, R]
        if config.attention_bias:
            qkv = qkv + lp["qkv_bias"][:, None]
        qkv = qkv.T.reshape(r, config.num_kv_heads, g + 2, config.head_dim)
        q = apply_rope(qkv[:, :, :g], sin, cos)  # [R, K, g, hd]
        k = apply_rope(qkv[:, :, g : g + 1], sin, cos)  # [R, K, 1, hd]
        k_buf = write_key_slots(cache.k[i], jnp.swapaxes(k, 1, 2), start)
        v_buf = write_value_slots(cache.v[i], jnp.swapaxes(qkv[:, :, g + 1 :], 1, 2), start)
        attn = _prefix_suffix_attention(q, prefix.k[i], prefix.v[i], prefix.mask, k_buf, v_buf, new_mask)  # [R, H*hd]
        x_t = x_t + lp["o_proj"] @ attn.T
        gate_up = (lp["gate_up"] @ _rms_norm_columns(x_t, lp["post_attn_norm"], eps)).reshape(-1, 2, r)  # [F, 2, R]
        x_t = x_t + lp["down_proj"] @ (jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1])
        ks.append(k_buf)
        vs.append(v_buf)
    logits_t = weights.head @ _rms_norm_columns(x_t, weights.final_norm, eps)  # [V, R]
    return logits_t.astype(jnp.float32), KVCache(k=tuple(ks), v=tuple(vs), mask=new_mask, index=start + 1)
