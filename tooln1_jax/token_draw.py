"""Drawing one token per row from vocabulary-major logits: temperature, then top-k, then top-p
(Hugging Face's order), by inverse CDF with one uniform per row and step (cheaper than a Gumbel
number per logit). The sampler (`sampling.py`) calls `sample_logits` once per decode step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingFilters:
    """The static (compile-time) part of the sampling settings; T and top_p values are traced."""

    greedy: bool
    top_k: int  # 0: no top-k
    use_top_p: bool


def row_uniforms(row_keys: jax.Array, step: jax.Array) -> jax.Array:
    """[R] uniforms in [0, 1): one per row, a pure function of (row key, step)."""
    return jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, step)))(row_keys)


def inverse_cdf(weights: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """weights [N, R] (unnormalised, >= 0; column r is row r's distribution), u [R] ->
    (index [R] int32, total [R]): the first j whose cumulative mass exceeds u * total, so
    P(j) = weights[j] / total; zero-mass entries are never picked.

    Two levels (blocks of ~sqrt(N), then within the chosen block), so no cumulative sum runs
    over the full vocabulary. Vocabulary-major, so each reduction
    over N runs across all R rows at once (vectorised over rows)."""
    n, r = weights.shape
    block = 1 << max(0, (n.bit_length() - 1) // 2)
    if n % block or n <= 2 * block:
        cdf = jnp.cumsum(weights, axis=0)
        idx = jnp.minimum(jnp.sum(cdf <= u * cdf[-1], axis=0), n - 1)
        return idx.astype(jnp.int32), cdf[-1]
    blocks = weights.reshape(n // block, block, r)
    block_cdf = jnp.cumsum(jnp.sum(blocks, axis=1), axis=0)  # [N/block, R]
    total = block_cdf[-1]
    target = u * total
    b = jnp.minimum(jnp.sum(block_cdf <= target, axis=0), n // block - 1)  # [R]
    inner = jnp.take_along_axis(blocks, b[None, None], axis=0)[0]  # [block, R]
    before = jnp.where(b > 0, jnp.take_along_axis(block_cdf, jnp.maximum(b - 1, 0)[None], axis=0)[0], 0.0)
    j = jnp.sum(before + jnp.cumsum(inner, axis=0) <= target, axis=0)
    # Rounding between the two sums can push j past the block's last positive entry: clamp to it.
    last_positive = block - 1 - jnp.argmax((inner > 0)[::-1], axis=0)
    return (b * block + jnp.minimum(j, last_positive)).astype(jnp.int32), total


def sample_logits(
    logits_t: jax.Array, u: jax.Array, temperature: jax.Array, top_p: jax.Array, filters: SamplingFilters
):
    """logits_t [V, R] float32, u [R] uniforms -> (tokens [R] int32, logprobs [R] float32).

    Vocabulary-major: the decode step's `head @ x` layout, so no consumer pays a strided
    transpose to rows. Temperature, then top-k, then top-p
    (Hugging Face's order; top-p renormalises over the top-k set). logprobs are under
    softmax(logits / T) over the full vocabulary (module doc)."""
    if filters.greedy:
        scaled = logits_t
        top = jnp.max(scaled, axis=0)  # [R]
        # argmax as the first index at the max: two plain reductions, faster on CPU than XLA's argmax
        vocab_ids = jnp.arange(scaled.shape[0], dtype=jnp.int32)[:, None]
        tokens = jnp.min(jnp.where(scaled == top, vocab_ids, scaled.shape[0] - 1), axis=0)
        logz = jax.nn.logsumexp(scaled, axis=0)
    else:
        scaled = logits_t / temperature
        top = jnp.max(scaled, axis=0)  # [R]
        if filters.top_k == 0 and not filters.use_top_p:
            tokens, total = inverse_cdf(jnp.exp(scaled - top), u)
            logz = top + jnp.log(total)  # the draw's normaliser doubles as the log-partition
        else:
            k = filters.top_k or logits_t.shape[0]
            values, order = jax.lax.top_k(scaled.T, min(k, logits_t.shape[0]))  # [R, k], descending
            probs = jax.nn.softmax(values, axis=-1)
            if filters.use_top_p:
                # HF removes tokens whose ascending cumulative mass is <= 1 - top_p, i.e. keeps a
                # token iff the mass ranked strictly above it is < top_p (the top token always stays).
                above = jnp.cumsum(probs, axis=-1) - probs
                probs = jnp.where(above < top_p, probs, 0.0)
            tokens = jnp.take_along_axis(order, inverse_cdf(probs.T, u)[0][:, None], axis=-1)[:, 0]
            logz = jax.nn.logsumexp(scaled, axis=0)
    logprobs = jnp.take_along_axis(scaled, tokens[None], axis=0)[0] - logz
    return tokens, logprobs
