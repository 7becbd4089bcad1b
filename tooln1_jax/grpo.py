"""GRPO maths as pure functions: group advantages, chunked token log-probs, the clipped loss.

The loss is built in two halves so micro-batches accumulate exactly:
`grpo_loss_terms` returns un-normalised sums plus the normaliser (a `LossTerms`),
`combine_terms` adds two of them, and `finalize_terms` divides once. `grpo_loss` is
the one-batch composition of the three.

Conventions: `logprobs[b, t]` is log p(token t | tokens < t) under
log_softmax(logits / temperature), aligned with `input_ids` (position 0 has no
prediction and is never in the loss mask).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from tooln1_jax.settings import DEFAULT_LOSS, KL_ESTIMATORS, LossSettings

_K3_CLAMP = 10.0
_LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: keeps a wild ratio finite instead of inf


# ----------------------------------------------------------------------------- advantages


def _grouped(rewards: jax.Array, group_size: int) -> jax.Array:
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [num_prompts * group_size], got shape {rewards.shape}")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards length {rewards.shape[0]} is not a multiple of group_size={group_size}")
    return rewards.reshape(-1, group_size)


def group_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-6, unbiased: bool = True) -> jax.Array:
    """rewards [N] (consecutive groups of `group_size` samples of one prompt) -> advantages [N].

    (r - group mean) / (group std + eps), with the unbiased (n - 1) std by default as in the
    reference. A group whose rewards are all equal gets exactly zero (also a group of one).
    """
    r = _grouped(rewards, group_size)
    mean = jnp.mean(r, axis=1, keepdims=True)
    ddof = 1 if (unbiased and group_size > 1) else 0
    std = jnp.std(r, axis=1, ddof=ddof, keepdims=True)
    # Compare, not trust rounding: the mean of equal floats need not equal them bit for bit.
    flat = jnp.max(r, axis=1, keepdims=True) == jnp.min(r, axis=1, keepdims=True)
    adv = jnp.where(flat, 0.0, (r - mean) / (std + eps))
    return adv.reshape(-1)


def nonzero_std_groups(rewards: jax.Array, group_size: int) -> jax.Array:
    """rewards [N] -> bool [N // group_size]: True for the groups whose rewards differ (a
    learning signal). With `rl.filter_zero_std_groups` the loop trains only those
    (`iteration.trained_groups`); every step logs the share of the others."""
    r = _grouped(rewards, group_size)
    return jnp.max(r, axis=1) != jnp.min(r, axis=1)


# ----------------------------------------------------------------------------- log-probs


def token_logprobs(
    hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, *, temperature: float = 1.0, chunk_size: int = 128
) -> tuple[jax.Array, jax.Array]:
    """Log-probs of `targets` and the entropy, under log_softmax(hidden @ lm_head / temperature).

    hidden [B, T, D] (any float dtype), lm_head [D, V], targets [B, T] int
    -> (logprobs [B, T] float32, entropy [B, T] float32).

    The sequence is processed `chunk_size` positions at a time under `lax.map`, each chunk
    under `jax.checkpoint`, so at most one [B, chunk_size, V] float32 logits block is live,
    in the forward and in the backward pass (which recomputes it).
    """
    b, t, d = hidden.shape
    if targets.shape != (b, t):
        raise ValueError(f"targets shape {targets.shape} does not match hidden {hidden.shape[:2]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    chunk = max(1, min(int(chunk_size), t))
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # [n, B, chunk, ...]: the batch axis stays whole (and sharded) inside each chunk.
    h_chunks = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
    t_chunks = targets.reshape(b, n, chunk).swapaxes(0, 1)
    w = lm_head.astype(hidden.dtype)
    inv_temp = 1.0 / temperature

    @jax.checkpoint
    def one_chunk(args):
        h, tgt = args
        z = jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32) * inv_temp
        logp = jax.nn.log_softmax(z, axis=-1)
        picked = jnp.take_along_axis(logp, tgt[..., None].astype(jnp.int32), axis=-1)[..., 0]
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        return picked, entropy

    lp, ent = jax.lax.map(one_chunk, (h_chunks, t_chunks))
    lp = lp.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    ent = ent.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    return lp, ent


# ----------------------------------------------------------------------------- loss


@flax.struct.dataclass
class LossTerms:
    """Un-normalised loss pieces of one (micro-)batch. Sums add, mins/maxes combine, and
    `finalize_terms` divides once, so any split of a batch gives the one-batch result."""

    loss_sum: jax.Array  # aggregation-weighted sum of the per-token total loss
    policy_sum: jax.Array  # same weighting, the clipped surrogate only
    normalizer: jax.Array  # divides the two sums above (tokens, sequences, or seqs * constant)
    token_count: jax.Array  # sum of the mask (metrics below are token means)
    seq_count: jax.Array  # sequences with at least one loss token
    kl_sum: jax.Array
    entropy_sum: jax.Array
    ratio_sum: jax.Array
    clip_count: jax.Array  # tokens where clipping changed the objective (either side)
    clip_low_count: jax.Array  # A < 0 and ratio < 1 - eps
    clip_high_count: jax.Array  # A > 0 and ratio > 1 + eps
    ratio_min: jax.Array
    ratio_max: jax.Array


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k3") -> jax.Array:
    """Per-token KL(policy || reference) estimate from sampled-token log-probs.

    k1 = logp - ref (unbiased, but its expected gradient on-policy is zero: it pulls nothing);
    k2 = (logp - ref)^2 / 2; k3 = exp(ref - logp) - (ref - logp) - 1, clamped to [-10, 10].
    """
    diff = logprobs - ref_logprobs
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff * diff
    if estimator == "k3":
        neg = -diff
        return jnp.clip(jnp.exp(neg) - neg - 1.0, -_K3_CLAMP, _K3_CLAMP)
    raise ValueError(f"kl_estimator={estimator!r}: expected one of {KL_ESTIMATORS}")


def grpo_loss_terms(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    ref_logprobs: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    settings: LossSettings = DEFAULT_LOSS,
    entropy: jax.Array | None = None,
) -> LossTerms:
    """The sums behind `grpo_loss`. logprobs, old_logprobs, ref_logprobs, mask, entropy
    [B, T]; advantages [B] (or [B, T]). `mask` may hold weights; 0 excludes a token.
    `ref_logprobs` may be None only when kl_coef == 0; `entropy` only when entropy_coef == 0."""
    clip_eps, kl_coef, entropy_coef = settings.clip_eps, settings.kl_coef, settings.entropy_coef
    aggregation, norm_constant = settings.aggregation, settings.norm_constant
    if ref_logprobs is None and kl_coef != 0:
        raise ValueError("ref_logprobs is None but kl_coef != 0")
    if entropy is None and entropy_coef != 0:
        raise ValueError("entropy is None but entropy_coef != 0")
    f32 = jnp.float32
    logprobs = logprobs.astype(f32)
    mask = mask.astype(f32)
    on = mask != 0
    adv = advantages.astype(f32)
    if adv.ndim == 1:
        adv = adv[:, None]

    log_ratio = jnp.clip(logprobs - old_logprobs.astype(f32), -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    policy = jnp.maximum(unclipped, clipped)  # pessimistic for either sign of A
    if ref_logprobs is None:
        kl = jnp.zeros_like(logprobs)
    else:
        kl = kl_penalty(logprobs, ref_logprobs.astype(f32), settings.kl_estimator)
    ent = jnp.zeros_like(logprobs) if entropy is None else entropy.astype(f32)
    total = policy + kl_coef * kl - entropy_coef * ent

    # where, not multiply: padded positions may hold inf/nan log-probs.
    masked = lambda x: jnp.where(on, x * mask, 0.0)
    tokens_per_seq = jnp.sum(mask, axis=-1)
    seq_count = jnp.sum(tokens_per_seq != 0).astype(f32)
    token_count = jnp.sum(mask)
    if aggregation == "token_mean":
        agg = lambda x: jnp.sum(masked(x))
        normalizer = token_count
    elif aggregation == "seq_mean_token_mean":
        per_seq = jnp.where(tokens_per_seq != 0, tokens_per_seq, 1.0)
        agg = lambda x: jnp.sum(jnp.sum(masked(x), axis=-1) / per_seq)
        normalizer = seq_count
    else:  # Dr. GRPO: a constant per-sequence normaliser, not the sequence's own length
        constant = float(mask.shape[-1] if norm_constant is None else norm_constant)
        agg = lambda x: jnp.sum(masked(x))
        normalizer = seq_count * constant

    big = jnp.finfo(f32).max
    return LossTerms(
        loss_sum=agg(total),
        policy_sum=agg(policy),
        normalizer=normalizer,
        token_count=token_count,
        seq_count=seq_count,
        kl_sum=jnp.sum(masked(kl)),
        entropy_sum=jnp.sum(masked(ent)),
        ratio_sum=jnp.sum(masked(ratio)),
        clip_count=jnp.sum(masked((clipped > unclipped).astype(f32))),
        clip_low_count=jnp.sum(masked(((adv < 0) & (ratio < 1.0 - clip_eps)).astype(f32))),
        clip_high_count=jnp.sum(masked(((adv > 0) & (ratio > 1.0 + clip_eps)).astype(f32))),
        ratio_min=jnp.min(jnp.where(on, ratio, big)),
        ratio_max=jnp.max(jnp.where(on, ratio, -big)),
    )


def empty_terms() -> LossTerms:
    """The terms of an empty batch: the identity of `combine_terms` (a scan's initial carry)."""
    zero = jnp.zeros((), jnp.float32)
    big = jnp.finfo(jnp.float32).max
    fields = {f: zero for f in LossTerms.__dataclass_fields__}
    return LossTerms(**dict(fields, ratio_min=jnp.full((), big), ratio_max=jnp.full((), -big)))


def combine_terms(a: LossTerms, b: LossTerms) -> LossTerms:
    """The terms of the union of two disjoint micro-batches."""
    sums = jax.tree.map(jnp.add, a, b)
    return sums.replace(
        ratio_min=jnp.minimum(a.ratio_min, b.ratio_min), ratio_max=jnp.maximum(a.ratio_max, b.ratio_max)
    )


def _safe_div(num, den):
    return jnp.where(den != 0, num / jnp.where(den != 0, den, 1.0), 0.0)


def finalize_terms(terms: LossTerms) -> tuple[jax.Array, dict]:
    """Divides once: (loss, metrics). An empty batch (no loss tokens) gives zeros."""
    tokens = terms.token_count
    metrics = {
        "loss": _safe_div(terms.loss_sum, terms.normalizer),
        "policy_loss": _safe_div(terms.policy_sum, terms.normalizer),
        "kl": _safe_div(terms.kl_sum, tokens),
        "entropy": _safe_div(terms.entropy_sum, tokens),
        "ratio_mean": _safe_div(terms.ratio_sum, tokens),
        "ratio_min": jnp.where(tokens != 0, terms.ratio_min, 1.0),
        "ratio_max": jnp.where(tokens != 0, terms.ratio_max, 1.0),
        "clip_frac": _safe_div(terms.clip_count, tokens),
        "clip_frac_low": _safe_div(terms.clip_low_count, tokens),
        "clip_frac_high": _safe_div(terms.clip_high_count, tokens),
        "num_tokens": tokens,
        "num_seqs": terms.seq_count,
    }
    return metrics["loss"], metrics


def grpo_loss(*arrays: jax.Array | None, **options) -> tuple[jax.Array, dict]:
    """The GRPO loss of one batch: `grpo_loss_terms` (same arguments: logprobs, old_logprobs,
    ref_logprobs, advantages, mask; settings=, entropy=), divided once. The PPO clipped
    surrogate max(-A r, -A clip(r, 1-eps, 1+eps)) with r = exp(logp - old), plus kl_coef * KL
    to the reference, minus entropy_coef * entropy,
    aggregated by `aggregation`:

    - "token_mean": sum over all loss tokens / their count;
    - "seq_mean_token_mean": each sequence's token mean, averaged over sequences;
    - "seq_mean_token_sum_norm" (Dr. GRPO): token sum / (num sequences * norm_constant),
      norm_constant defaulting to T.

    Shapes: [B, T] for log-probs, mask and entropy; advantages [B]. Returns (loss [], metrics).
    Metrics (token means over the mask): loss, policy_loss, kl, entropy, ratio_mean/min/max,
    clip_frac (+ _low for A<0, _high for A>0), num_tokens, num_seqs.
    """
    return finalize_terms(grpo_loss_terms(*arrays, **options))
