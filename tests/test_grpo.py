"""GRPO maths against hand-computed values: advantages, chunked log-probs, the clipped loss."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tooln1_jax import grpo
from tooln1_jax.grpo import (
    LossSettings,
    combine_terms,
    finalize_terms,
    group_advantages,
    kl_penalty,
    nonzero_std_groups,
)

# Jitted once per option set: op-by-op dispatch of the loss costs more than its compile.
_STATIC = ("settings",)  # LossSettings is hashable
grpo_loss = jax.jit(grpo.grpo_loss, static_argnames=_STATIC)
grpo_loss_terms = jax.jit(grpo.grpo_loss_terms, static_argnames=_STATIC)
NO_KL = LossSettings(kl_coef=0.0)
token_logprobs = jax.jit(grpo.token_logprobs, static_argnames=("temperature", "chunk_size"))

# ----------------------------------------------------------------------------- advantages


def test_group_advantages_unbiased_and_biased():
    rewards = np.array([1, 0, 0, 0, 1, 1, 0, 0], np.float32)
    g1 = rewards[:4]
    want_unbiased = np.concatenate([(g - g.mean()) / (g.std(ddof=1) + 1e-6) for g in (rewards[:4], rewards[4:])])
    want_biased = np.concatenate([(g - g.mean()) / (g.std(ddof=0) + 1e-6) for g in (rewards[:4], rewards[4:])])
    np.testing.assert_allclose(group_advantages(rewards, 4), want_unbiased, rtol=1e-6)
    np.testing.assert_allclose(group_advantages(rewards, 4, unbiased=False), want_biased, rtol=1e-6)
    # By hand: group [1,0,0,0]: mean 0.25, unbiased std 0.5 -> winner 1.5, losers -0.5.
    np.testing.assert_allclose(group_advantages(rewards, 4)[:4], [1.5, -0.5, -0.5, -0.5], rtol=1e-5)
    assert g1.std(ddof=0) != g1.std(ddof=1)


def test_equal_groups_get_exactly_zero_and_can_be_filtered():
    # 0.1 is not exactly representable: the group mean may round away from the members.
    rewards = np.array([0.1, 0.1, 0.1, 1.0, 0.0, 1.0, 0.7, 0.7, 0.7], np.float32)
    adv = np.asarray(group_advantages(rewards, 3))
    assert np.all(adv[:3] == 0.0) and np.all(adv[6:] == 0.0)
    assert np.all(adv[3:6] != 0.0)
    np.testing.assert_array_equal(nonzero_std_groups(rewards, 3), [False, True, False])
    assert np.all(np.asarray(group_advantages(np.ones(4, np.float32), 1)) == 0.0)  # groups of one


def test_group_advantages_rejects_bad_shapes():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(np.zeros(6, np.float32), 4)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(np.zeros((2, 4), np.float32), 4)


# ----------------------------------------------------------------------------- token log-probs


def _inputs(b=2, t=7, d=5, v=11, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return jax.random.normal(k1, (b, t, d)), jax.random.normal(k2, (d, v)), jax.random.randint(k3, (b, t), 0, v)


@functools.partial(jax.jit, static_argnums=3)
def _full_logprobs(hidden, w, targets, temperature):
    logp = jax.nn.log_softmax((hidden @ w) / temperature, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, -jnp.sum(jnp.exp(logp) * logp, axis=-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_token_logprobs_equal_full_log_softmax(chunk_size):
    hidden, w, targets = _inputs()
    lp, ent = token_logprobs(hidden, w, targets, temperature=0.7, chunk_size=chunk_size)
    want_lp, want_ent = _full_logprobs(hidden, w, targets, 0.7)
    np.testing.assert_allclose(lp, want_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)
    # Gradients too (the chunks are rematerialised in the backward pass).
    f = lambda fn: jax.grad(lambda h, w: jnp.sum(fn(h, w)[0] * jnp.arange(7.0)), argnums=(0, 1))(hidden, w)
    got = f(lambda h, w: token_logprobs(h, w, targets, temperature=0.7, chunk_size=chunk_size))
    want = f(lambda h, w: _full_logprobs(h, w, targets, 0.7))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_token_logprobs_never_builds_whole_batch_logits():
    hidden, w, targets = _inputs(b=2, t=8, d=5, v=11)

    def loss(h, w):
        lp, _ = token_logprobs(h, w, targets, temperature=1.0, chunk_size=2)
        return jnp.sum(lp)

    text = str(jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(hidden, w))
    assert "f32[2,2,11]" in text  # one chunk's logits
    assert "f32[2,8,11]" not in text and "f32[4,2,2,11]" not in text


# ----------------------------------------------------------------------------- loss


def test_clipped_surrogate_by_hand_both_signs():
    # seq 0 has A = +1 with ratios (1.5, 0.5); seq 1 has A = -1 with ratios (0.7, 1.5); eps 0.2.
    ratios = np.array([[1.5, 0.5], [0.7, 1.5]], np.float32)
    old = np.full((2, 2), -1.0, np.float32)
    logp = jnp.asarray(old + np.log(ratios))
    adv = np.array([1.0, -1.0], np.float32)
    mask = np.ones((2, 2), np.float32)
    # Per token max(-A r, -A clip(r)): -1.2 (clipped high), -0.5, 0.8 (clipped low), 1.5.
    loss, m = grpo_loss(logp, old, None, adv, mask, settings=NO_KL)
    np.testing.assert_allclose(loss, (-1.2 - 0.5 + 0.8 + 1.5) / 4, rtol=1e-5)
    np.testing.assert_allclose(m["policy_loss"], 0.15, rtol=1e-5)
    np.testing.assert_allclose([m["clip_frac"], m["clip_frac_low"], m["clip_frac_high"]], [0.5, 0.25, 0.25])
    np.testing.assert_allclose([m["ratio_min"], m["ratio_max"], m["ratio_mean"]], [0.5, 1.5, 1.05], rtol=1e-5)
    # d loss / d logp = -A r / 4 where unclipped, 0 where the clip is active.
    grad = jax.grad(lambda lp: grpo_loss(lp, old, None, adv, mask, settings=NO_KL)[0])(logp)
    np.testing.assert_allclose(grad, [[0.0, -0.5 / 4], [0.0, 1.5 / 4]], atol=1e-6)


def test_negative_advantage_inside_clip_range_is_not_clipped():
    # A < 0 and r > 1 + eps: the unclipped -A r is larger (more pessimistic) and must be used.
    loss, m = grpo_loss(
        jnp.log(jnp.array([[2.0]])), jnp.zeros((1, 1)), None, jnp.array([-1.0]), jnp.ones((1, 1)), settings=NO_KL
    )
    np.testing.assert_allclose(loss, 2.0, rtol=1e-6)
    assert float(m["clip_frac"]) == 0.0


@pytest.mark.parametrize(
    "estimator, want",
    [
        ("k1", [0.5, -1.0]),
        ("k2", [0.125, 0.5]),
        ("k3", [math.exp(-0.5) + 0.5 - 1.0, math.exp(1.0) - 2.0]),
    ],
)
def test_kl_estimators_by_hand(estimator, want):
    logp = jnp.array([[-1.0, -2.0]])
    ref = jnp.array([[-1.5, -1.0]])
    np.testing.assert_allclose(kl_penalty(logp, ref, estimator)[0], want, rtol=1e-6)
    loss, m = grpo_loss(
        logp, logp, ref, jnp.zeros(1), jnp.ones((1, 2)), settings=LossSettings(kl_coef=0.5, kl_estimator=estimator)
    )
    np.testing.assert_allclose(m["kl"], np.mean(want), rtol=1e-6)
    np.testing.assert_allclose(loss, 0.5 * np.mean(want), rtol=1e-6)


def test_k3_is_clamped():
    np.testing.assert_allclose(kl_penalty(jnp.array([-30.0]), jnp.array([0.0]), "k3"), [10.0])


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_kl_gradient_pulls_policy_toward_reference(estimator):
    """Exact on-policy expectation: every vocab entry is a 'token', weighted by the (frozen)
    policy probability through the mask. One SGD step must reduce KL in both directions."""
    k1, k2 = jax.random.split(jax.random.key(1))
    theta = jax.random.normal(k1, (4, 6))
    ref_logits = jax.random.normal(k2, (4, 6))
    ref_lp = jax.nn.log_softmax(ref_logits)

    def kl_loss(th, est):
        lp = jax.nn.log_softmax(th)
        weights = jax.lax.stop_gradient(jnp.exp(lp))
        return grpo_loss(
            lp,
            jax.lax.stop_gradient(lp),
            ref_lp,
            jnp.zeros(4),
            weights,
            settings=LossSettings(kl_coef=1.0, kl_estimator=est),
        )[0]

    def kl_exact(th):
        p, r = jax.nn.softmax(th), jnp.exp(ref_lp)
        return float(jnp.sum(p * (jnp.log(p) - ref_lp))), float(jnp.sum(r * (ref_lp - jnp.log(p))))

    grad = jax.grad(kl_loss)(theta, estimator)
    before, after = kl_exact(theta), kl_exact(theta - 0.5 * grad)
    assert after[0] < before[0] - 1e-3 and after[1] < before[1] - 1e-3
    # k1's expected on-policy gradient is zero: as a loss term it pulls nothing (a known defect).
    np.testing.assert_allclose(jax.grad(kl_loss)(theta, "k1"), 0.0, atol=1e-6)


def _agg_example():
    # ratio 1 everywhere, so the per-token loss is -A: seq 0 has 3 tokens of -1, seq 1 one token
    # of +2, seq 2 no loss tokens.
    logp = jnp.full((3, 4), -1.0)
    adv = jnp.array([1.0, -2.0, 5.0])
    mask = jnp.array([[0, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0]], jnp.float32)
    return logp, adv, mask


@pytest.mark.parametrize(
    "aggregation, norm_constant, want",
    [
        ("token_mean", None, (-3.0 + 2.0) / 4),
        ("seq_mean_token_mean", None, (-1.0 + 2.0) / 2),
        ("seq_mean_token_sum_norm", 10.0, (-3.0 + 2.0) / (2 * 10.0)),
        ("seq_mean_token_sum_norm", None, (-3.0 + 2.0) / (2 * 4)),  # default constant: T
    ],
)
def test_aggregations_by_hand_and_split_exactly(aggregation, norm_constant, want):
    logp, adv, mask = _agg_example()
    kw = dict(settings=LossSettings(kl_coef=0.0, aggregation=aggregation, norm_constant=norm_constant))
    loss, m = grpo_loss(logp, logp, None, adv, mask, **kw)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert float(m["num_tokens"]) == 4 and float(m["num_seqs"]) == 2
    # Any split of the rows, combined, gives the same loss and metrics.
    parts = [grpo_loss_terms(logp[s], logp[s], None, adv[s], mask[s], **kw) for s in (slice(0, 1), slice(1, 3))]
    loss2, m2 = finalize_terms(combine_terms(*parts))
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    for k in m:
        np.testing.assert_allclose(m2[k], m[k], rtol=1e-6, err_msg=k)


def test_entropy_bonus_and_padding_nan_ignored():
    logp = jnp.array([[jnp.nan, -1.0, -2.0]])  # the masked slot may hold garbage
    ent = jnp.array([[jnp.nan, 2.0, 4.0]])
    mask = jnp.array([[0.0, 1.0, 1.0]])
    loss, m = grpo_loss(logp, logp, logp, jnp.zeros(1), mask, entropy=ent, settings=LossSettings(entropy_coef=0.1))
    np.testing.assert_allclose(loss, -0.1 * 3.0, rtol=1e-6)
    np.testing.assert_allclose(m["entropy"], 3.0, rtol=1e-6)


def test_bad_options_fail_clearly():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo_loss(x, x, x, jnp.zeros(1), x, settings=LossSettings(kl_estimator="k4"))
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(x, x, x, jnp.zeros(1), x, settings=LossSettings(aggregation="sum"))
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(x, x, None, jnp.zeros(1), x, settings=LossSettings(kl_coef=0.1))
