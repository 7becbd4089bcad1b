"""Causal grouped-query attention, four implementations behind one selector (`attention`).

Every implementation takes the mask in linear form instead of a [B, T, S] array:
key_valid [B, S] (nonzero where key slot s holds a real token) and query_start, the slot of
query 0, so query t sits at slot query_start + t and may attend key s iff key_valid[b, s] and
s <= query_start + t. Training and log-probs use query_start 0 and S = T; a prefill against
the KV cache uses the cache's slots as keys and its write index as query_start.

- "dense": the reference; materialises the float32 scores [B, K, g*T, S] (quadratic memory).
- "blockwise": online softmax over key blocks under `lax.scan`, with a custom VJP that saves
  only the output and the per-row max and sum, so forward and backward memory grow linearly
  in the sequence length. Equal to "dense" on every row, fully padded rows included.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's flash attention
  (GPU, bf16/fp16, head_dim a multiple of 8).
- "splash": the Pallas splash-attention TPU kernel (`jax.experimental.pallas.ops.tpu`), run in
  Pallas interpret mode off TPU (slow; for tests).

"cudnn" and "splash" know causal masks and key lengths, not an arbitrary key_valid: they run
on the key slots (queries placed at their slots), "cudnn" on the valid slots compacted to the
front, "splash" with key_valid as segment ids. Rows whose own slot is padding come back as
zeros there (finite; "dense" gives an average of values for them), real rows equal "dense".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

NEG = float(jnp.finfo(jnp.float32).min)  # masked score, as in the dense reference
BLOCK = 512  # keys per blockwise step
SPLASH_BLOCK = 128  # splash kernel tile: sequence lengths are padded to a multiple


def causal_mask(key_valid: jax.Array, query_start, t: int) -> jax.Array:
    """key_valid [B, S] -> mask [B, T, S] bool: the linear mask in dense form (quadratic; only the
    dense reference builds it)."""
    slots = jnp.arange(key_valid.shape[1])
    causal = slots[None, :] <= (query_start + jnp.arange(t))[:, None]
    return causal[None] & (key_valid[:, None, :] > 0)


def _grouped(q: jax.Array, kv_heads: int) -> jax.Array:
    """q [B, T, H, hd] -> [B, K, g*T, hd]: the g query heads of a kv head stacked along rows."""
    b, t, h, hd = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, -1, hd)


def _ungrouped(o: jax.Array, t: int) -> jax.Array:
    """[B, K, g*T, hd] -> [B, T, H * hd], the inverse of `_grouped`."""
    b, kv_heads, m, hd = o.shape
    return o.reshape(b, kv_heads, m // t, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, -1)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention with a dense mask: the reference.

    q [B, T, H, hd], k and v [B, S, K, hd] with H a multiple of K, mask [B, T, S] bool
    (True where query t may attend to key s). Returns [B, T, H * hd].

    The g = H / K query heads that share a kv head stack into one [g*T, hd] x [hd, S] product per
    (batch, kv head): fewer, larger matmuls than one per query head (docs/performance_history.md).
    """
    b, t, h, hd = q.shape
    kv_heads = k.shape[2]
    scores = jnp.einsum("bkmd,bskd->bkms", _grouped(q, kv_heads), k, preferred_element_type=jnp.float32)
    scores = (scores * (hd**-0.5)).reshape(b, kv_heads, h // kv_heads, t, -1)
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv_heads, h // kv_heads * t, -1)
    return _ungrouped(jnp.einsum("bkms,bskd->bkmd", probs, v), t)


def _key_blocks(k, v, key_valid, block):
    """Keys split into blocks along S (padded to a multiple of `block`): k, v [n, B, block, K, hd],
    key_valid [n, B, block] bool, slots [n, block]."""
    b, s = key_valid.shape
    pad = -s % block
    n = (s + pad) // block

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, block, *x.shape[2:]), 1, 0)

    return split(k), split(v), split(key_valid > 0), jnp.arange(n * block).reshape(n, block)


def _block_scores(qg, kb, valid_b, slots_b, q_slots, s):
    """Scaled scores of one key block, [B, K, M, block] float32: NEG where masked (as the dense
    reference), -inf past the last key (padding of the blocks, which no row may weigh). Also
    returns the allowed mask [B, 1, M, block]."""
    scores = jnp.einsum("bkmd,bskd->bkms", qg, kb, preferred_element_type=jnp.float32) * (qg.shape[-1] ** -0.5)
    allowed = valid_b[:, None, None, :] & (slots_b[None, None, None, :] <= q_slots[None, None, :, None])
    scores = jnp.where(allowed, scores, NEG)
    return jnp.where(slots_b < s, scores, -jnp.inf), allowed


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise(qg, k, v, key_valid, q_slots, block):
    return _blockwise_forward(qg, k, v, key_valid, q_slots, block)[0]


def _blockwise_forward(qg, k, v, key_valid, q_slots, block):
    """qg [B, K, M, hd] (M = g*T), k and v [B, S, K, hd], q_slots [M] -> (out [B, K, M, hd] in
    v.dtype, row max m and row sum `total` [B, K, M] float32)."""
    b, kv_heads, m_rows, hd = qg.shape
    s = k.shape[1]

    def step(carry, blk):
        m, total, acc = carry
        kb, vb, valid_b, slots_b = blk
        scores, _ = _block_scores(qg, kb, valid_b, slots_b, q_slots, s)
        m_new = jnp.maximum(m, scores.max(-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[..., None])
        acc = acc * correction[..., None] + jnp.einsum(
            "bkms,bskd->bkmd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32
        )
        return (m_new, total * correction + p.sum(-1), acc), None

    rows = (b, kv_heads, m_rows)
    init = (jnp.full(rows, -jnp.inf), jnp.zeros(rows), jnp.zeros((*rows, hd)))
    (m, total, acc), _ = jax.lax.scan(step, init, _key_blocks(k, v, key_valid, block))
    return (acc / total[..., None]).astype(v.dtype), m, total


def _blockwise_fwd(qg, k, v, key_valid, q_slots, block):
    out, m, total = _blockwise_forward(qg, k, v, key_valid, q_slots, block)
    return out, (qg, k, v, key_valid, q_slots, out, m, total)


def _blockwise_bwd(block, res, d_out):
    """Flash-attention backward: each key block's probabilities are recomputed from the saved row
    max and sum, so no [M, S] matrix is ever stored. Masked scores get no gradient (the dense
    reference's `where`), and a fully masked row's uniform weights still reach dv."""
    qg, k, v, key_valid, q_slots, out, m, total = res
    s = k.shape[1]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [B, K, M]
    scale = qg.shape[-1] ** -0.5

    def step(dq, blk):
        kb, vb, valid_b, slots_b = blk
        scores, allowed = _block_scores(qg, kb, valid_b, slots_b, q_slots, s)
        p = jnp.exp(scores - m[..., None]) / total[..., None]
        dv = jnp.einsum("bkms,bkmd->bskd", p.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkmd,bskd->bkms", d_out, vb, preferred_element_type=jnp.float32)
        ds = jnp.where(allowed, p * (dp - delta[..., None]), 0.0) * scale
        dq = dq + jnp.einsum("bkms,bskd->bkmd", ds, kb, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bkms,bkmd->bskd", ds, qg, preferred_element_type=jnp.float32)
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(qg.shape), _key_blocks(k, v, key_valid, block))

    def unblocked(x, like):  # [n, B, block, K, hd] -> [B, S, K, hd]
        return jnp.moveaxis(x, 0, 1).reshape(like.shape[0], -1, *like.shape[2:])[:, :s].astype(like.dtype)

    return dq.astype(qg.dtype), unblocked(dk, k), unblocked(dv, v), None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q, k, v, key_valid, query_start=0, block: int | None = None) -> jax.Array:
    """q [B, T, H, hd], k and v [B, S, K, hd], key_valid [B, S] -> [B, T, H * hd], equal to
    `dense_attention` with `causal_mask(key_valid, query_start, T)` but in memory linear in T and S:
    no [T, S] array lives longer than one [g*T, block] score block, forward or backward.
    `block` None: BLOCK keys."""
    t, kv_heads = q.shape[1], k.shape[2]
    q_slots = jnp.tile(query_start + jnp.arange(t), q.shape[2] // kv_heads)  # row m = (head, t)
    return _ungrouped(_blockwise(_grouped(q, kv_heads), k, v, key_valid, q_slots, min(block or BLOCK, k.shape[1])), t)


def _at_key_slots(q: jax.Array, s: int, query_start) -> jax.Array:
    """q [B, T, H, hd] placed at slots query_start ... query_start+T-1 of a zero [B, S, H, hd] (a
    no-op for T = S at 0): the kernels below mask causally by position, so queries and keys share
    one slot axis."""
    if q.shape[1] == s and isinstance(query_start, int) and query_start == 0:
        return q
    return jax.lax.dynamic_update_slice(jnp.zeros((q.shape[0], s, *q.shape[2:]), q.dtype), q, (0, query_start, 0, 0))


def _at_query_slots(o: jax.Array, key_valid: jax.Array, t: int, query_start) -> jax.Array:
    """o [B, S, H, hd] over key slots -> [B, T, H * hd] at the query slots, zero where the query's
    own slot is padding."""
    b, _, h, hd = o.shape
    o = jax.lax.dynamic_slice(o, (0, query_start, 0, 0), (b, t, h, hd))
    real = jax.lax.dynamic_slice(key_valid > 0, (0, query_start), (b, t))
    return jnp.where(real[:, :, None, None], o, 0).reshape(b, t, h * hd)


def cudnn_attention(q, k, v, key_valid, query_start=0, implementation: str | None = "cudnn") -> jax.Array:
    """Shapes as `blockwise_attention`. Each row's valid key slots move to the front (a stable
    sort, so causal order holds), which turns any key mask into the right padding cuDNN's
    `key_value_seq_lengths` describes: linear memory, no [B, T, S] bias. `implementation` "xla"
    runs the same call on any backend (the CPU tests)."""
    b, s = key_valid.shape
    order = jnp.argsort(key_valid <= 0, axis=1, stable=True)  # [B, S]: valid slots first

    def compact(x):
        return jnp.take_along_axis(x, order[:, :, None, None], axis=1)

    lengths = jnp.maximum(jnp.sum(key_valid > 0, axis=1), 1).astype(jnp.int32)
    o = jax.nn.dot_product_attention(
        compact(_at_key_slots(q, s, query_start)),
        compact(k),
        compact(v),
        is_causal=True,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )
    o = jnp.take_along_axis(o, jnp.argsort(order, axis=1)[:, :, None, None], axis=1)  # back to slot order
    return _at_query_slots(o, key_valid, q.shape[1], query_start)


@functools.cache
def _splash_kernel(length: int, g: int, interpret: bool):
    """The splash kernel for g query heads over one kv head, causal over `length` slots (its mask
    tables built as constants, not in the caller's trace, so the cached kernel outlives it)."""
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * g)
    sizes = splash.BlockSizes(*(SPLASH_BLOCK,) * 3, *(SPLASH_BLOCK,) * 5)  # forward, dkv, dq tiles
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q, k, v, key_valid, query_start=0, interpret: bool | None = None) -> jax.Array:
    """Shapes as `blockwise_attention`. key_valid becomes the segment ids of queries and keys
    alike (a padding query meets at least its own padding key, so no row is empty); slots pad to
    a multiple of SPLASH_BLOCK. `interpret` None: Pallas interpret mode off TPU."""
    b, s, kv_heads, hd = k.shape
    h = q.shape[2]
    pad = -s % SPLASH_BLOCK

    def padded(x):
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

    qs = padded(_at_key_slots(q, s, query_start) * jnp.asarray(hd**-0.5, q.dtype))
    qs = qs.reshape(b, s + pad, kv_heads, h // kv_heads, hd).transpose(0, 2, 3, 1, 4)  # [B, K, g, S', hd]
    ks, vs = (padded(x).transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, S', hd]
    segments = padded((key_valid > 0).astype(jnp.int32))
    kernel = _splash_kernel(s + pad, h // kv_heads, jax.default_backend() != "tpu" if interpret is None else interpret)

    def one_row(qr, kr, vr, seg):
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=splash.SegmentIds(seg, seg)))(qr, kr, vr)

    o = jax.vmap(one_row)(qs, ks, vs, segments)  # [B, K, g, S', hd]
    o = o.transpose(0, 3, 1, 2, 4)[:, :s].reshape(b, s, h, hd)
    return _at_query_slots(o, key_valid, q.shape[1], query_start)


CUDNN_MIN_CAPABILITY = 8.0  # Ampere: the GPUs cuDNN's flash-attention kernels target (a T4 is 7.5)


def _gpu_capability() -> float:
    """This process's first GPU's CUDA compute capability (0.0 if it reports none)."""
    return float(getattr(jax.devices("gpu")[0], "compute_capability", "0") or 0)


def resolve(impl: str, dtype, kv_len: int, backend: str | None = None, gpu_capability: float | None = None) -> str:
    """The implementation "auto" stands for at `kv_len` key slots (others pass through): "splash"
    on TPU; "cudnn" on a GPU of compute capability >= 8.0 in bf16/fp16 (cuDNN's flash attention
    has no float32, and older GPUs such as Colab's T4 are left to the portable path); else
    "blockwise", but "dense" up to one key block (`BLOCK`), where blockwise keeps no less memory
    (one block is the whole score matrix) and the figures in the README (the demo, W1) were
    measured. On CPU blockwise was 1.2x dense's speed at 256 tokens and 2x at 4,096
    (docs/performance_history.md)."""
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        capability = _gpu_capability() if gpu_capability is None else gpu_capability
        if capability >= CUDNN_MIN_CAPABILITY:
            return "cudnn"
    return "dense" if kv_len <= BLOCK else "blockwise"


def attention(impl: str, q, k, v, key_valid, query_start=0) -> jax.Array:
    """Causal GQA by `impl` (`settings.ATTENTION_IMPLS`): q [B, T, H, hd], k and v [B, S, K, hd],
    key_valid [B, S], query t at slot query_start + t -> [B, T, H * hd]."""
    impl = resolve(impl, q.dtype, k.shape[1])
    if impl == "dense":
        return dense_attention(q, k, v, causal_mask(key_valid, query_start, q.shape[1]))
    if impl == "blockwise":
        return blockwise_attention(q, k, v, key_valid, query_start)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, key_valid, query_start)
    if impl == "splash":
        return splash_attention(q, k, v, key_valid, query_start)
    raise ValueError(f"attention_impl={impl!r}: unknown")
