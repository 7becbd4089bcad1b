"""The jitted GRPO step: exact micro-batch accumulation, 8 devices == 1, on-policy ratio 1,
the non-finite guard."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tooln1_jax.grpo import LossSettings, grpo_loss
from tooln1_jax.models import ModelConfig, init_params, shard_params
from tooln1_jax.optimizer import OptimizerSettings, make_optimizer
from tooln1_jax.sharding import TRAIN_RULES, make_mesh
from tooln1_jax.train_step import (
    compute_logprobs,
    init_train_state,
    loss_and_grads,
    make_grpo_step,
    reference_params,
    sequence_logprobs,
    shard_batch,
)

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    tie_word_embeddings=True,
)
B, P, C = 8, 6, 6  # rows, prompt width, completion width
TEMP = 0.7


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def ref_params():
    # A different model, so the KL term is non-trivial.
    return init_params(CFG, jax.random.key(1))


def make_batch(seed=0, with_old=True):
    """Left-padded prompts of varying length, completions of varying length (right-padded)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, CFG.vocab_size, (B, P + C)).astype(np.int32)
    prompt_len = rng.integers(2, P + 1, B)
    completion_len = rng.integers(1, C + 1, B)
    cols = np.arange(P + C)[None]
    attn = ((cols >= P - prompt_len[:, None]) & (cols < P + completion_len[:, None])).astype(np.int32)
    loss_mask = ((cols >= P) & (cols < P + completion_len[:, None])).astype(np.float32)
    ids = np.where(attn == 1, ids, 0)
    batch = dict(
        input_ids=ids, attention_mask=attn, loss_mask=loss_mask, advantages=rng.normal(size=B).astype(np.float32)
    )
    if with_old:  # off-policy enough that both clip sides are active
        batch["old_logprobs"] = (-np.log(CFG.vocab_size) + rng.normal(scale=0.5, size=(B, P + C))).astype(np.float32)
    return batch


LOSS_KW = dict(temperature=TEMP, chunk_size=4)
KL = dict(kl_coef=0.05, kl_estimator="k3")


@functools.partial(jax.jit, static_argnames=("micro_batch_size", "aggregation"))
def _loss_and_grads(params, ref, batch, micro_batch_size, aggregation):
    return loss_and_grads(
        CFG,
        params,
        ref,
        batch,
        micro_batch_size=micro_batch_size,
        loss_settings=LossSettings(aggregation=aggregation, **KL),
        **LOSS_KW,
    )


@functools.partial(jax.jit, static_argnames=("aggregation",))
def _direct_loss_and_grads(params, ref, batch, aggregation):
    """The whole batch at once, no scan: grpo_loss on sequence_logprobs."""

    def loss(p):
        lp, ent = sequence_logprobs(CFG, p, batch["input_ids"], batch["attention_mask"], temperature=TEMP, chunk_size=4)
        ref_lp, _ = sequence_logprobs(
            CFG, ref, batch["input_ids"], batch["attention_mask"], temperature=TEMP, chunk_size=4
        )
        return grpo_loss(
            lp,
            batch["old_logprobs"],
            ref_lp,
            batch["advantages"],
            batch["loss_mask"],
            settings=LossSettings(kl_coef=0.05, aggregation=aggregation),
            entropy=ent,
        )

    (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, grads, metrics


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


def test_micro_batches_equal_one_big_batch(params, ref_params):
    # (The (sum, count) split of every aggregation is tested on the loss alone in test_grpo.)
    batch = make_batch()
    want_loss, want_grads, want_m = _direct_loss_and_grads(params, ref_params, batch, "token_mean")
    assert 0 < float(want_m["clip_frac_low"]) and 0 < float(want_m["clip_frac_high"])
    assert float(jnp.abs(want_m["kl"])) > 1e-4
    loss, grads, m = _loss_and_grads(params, ref_params, batch, 2, "token_mean")
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-7)
    _assert_trees_close(grads, want_grads)
    for k in ("kl", "clip_frac", "ratio_min", "ratio_max", "entropy", "num_tokens"):
        np.testing.assert_allclose(m[k], want_m[k], rtol=1e-5, err_msg=k)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


OPT = make_optimizer(OptimizerSettings(1e-3))
STEP_KW = dict(micro_batch_size=4, loss_settings=LossSettings(**KL), **LOSS_KW)


@pytest.fixture(scope="module")
def single_step():
    """One compiled single-device step shared by the tests below."""
    return make_grpo_step(CFG, OPT, **STEP_KW)


def test_step_on_8_devices_equals_1_device(params, ref_params, single_step):
    assert jax.device_count() == 8, "conftest should give 8 virtual CPU devices"
    batches = [make_batch(0), make_batch(1)]
    state = init_train_state(params, OPT)
    ref1 = reference_params(ref_params)
    for b in batches:  # two steps, so the second uses the Adam moments
        state, m1 = single_step(state, ref1, b)
    want = _host(state.params)

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = make_grpo_step(CFG, OPT, mesh=mesh, rules=TRAIN_RULES, **STEP_KW)
    state8 = init_train_state(params, OPT, model_config=CFG, mesh=mesh)
    ref8 = reference_params(shard_params(ref_params, CFG, mesh, TRAIN_RULES))
    for b in batches:
        state8, m8 = sharded(state8, ref8, shard_batch(b, mesh, micro_batch_size=4))
    q = state8.params["layers"]["q_proj"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 16, 16)
    assert int(state8.step) == 2 and bool(m8["finite"])
    for k in ("loss", "grad_norm", "kl", "clip_frac", "ratio_max"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, err_msg=k)
    got = _host(state8.params)
    # k_bias has a true gradient of zero (softmax is shift-invariant per query), so Adam's
    # g / |g| turns float noise into lr-sized moves that differ between layouts; every
    # other parameter must agree.
    k_bias = got["layers"].pop("k_bias"), want["layers"].pop("k_bias")
    assert np.all(np.abs(k_bias[0] - k_bias[1]) <= 2 * 2 * 1e-3 + 1e-6)
    _assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    start = _host(params)
    start["layers"].pop("k_bias")
    assert (
        max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(start))) > 1e-4
    )  # it really moved


def test_on_policy_ratio_is_one_with_recomputed_old_logprobs(params, ref_params, single_step):
    batch = make_batch(with_old=False)
    batch["old_logprobs"] = np.asarray(compute_logprobs(CFG, params, batch, TEMP, chunk_size=4, micro_batch_size=2))
    # The completion-only computation gives the same completion log-probs.
    tail = compute_logprobs(CFG, params, batch, TEMP, chunk_size=4, completion_len=C)
    np.testing.assert_allclose(np.asarray(tail)[:, P:], batch["old_logprobs"][:, P:], atol=1e-6)
    _, m = single_step(init_train_state(params, OPT), reference_params(ref_params), batch)
    assert abs(float(m["ratio_min"]) - 1) < 1e-5 and abs(float(m["ratio_max"]) - 1) < 1e-5
    assert float(m["clip_frac"]) == 0.0


def test_sampler_logprobs_match_recomputed_ones(params):
    from tooln1_jax import sampling

    prompts = [[5, 9, 3], [7, 1, 2, 8, 4]]
    n, new = 2, 8
    out = sampling.sample(
        CFG, params, prompts, num_samples=n, max_new_tokens=new, temperature=TEMP, rng=jax.random.key(3)
    )
    tokens, sampled_lp, mask = (np.asarray(x) for x in (out.tokens, out.logprobs, out.mask))
    width = max(map(len, prompts))
    pad = np.array([width - len(p) for p in prompts for _ in range(n)])
    p_ids = np.array([[0] * (width - len(p)) + p for p in prompts for _ in range(n)], np.int32)
    p_mask = (np.arange(width)[None] >= pad[:, None]).astype(np.int32)
    batch = dict(
        input_ids=np.concatenate([p_ids, np.where(mask, tokens, 0)], 1),
        attention_mask=np.concatenate([p_mask, mask.astype(np.int32)], 1),
    )
    recomputed = np.asarray(compute_logprobs(CFG, params, batch, TEMP, chunk_size=4))[:, width:]
    ratio = np.exp(recomputed - sampled_lp)[mask]
    assert mask.sum() > 4
    assert np.max(np.abs(ratio - 1)) < 1e-5


def test_non_finite_batch_leaves_state_unchanged(params, ref_params, single_step):
    state = init_train_state(params, OPT)
    before = _host(state)
    ref = reference_params(ref_params)
    bad = make_batch()
    bad["advantages"][3] = np.nan
    state, m = single_step(state, ref, bad)  # `state` was donated: rebind it
    assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
    assert int(state.step) == 0
    _assert_trees_close(_host(state.params), before.params, rtol=0, atol=0)
    _assert_trees_close(_host(state.opt_state), before.opt_state, rtol=0, atol=0)
    state, m = single_step(state, ref, make_batch())
    assert bool(m["finite"]) and int(state.step) == 1


def test_bad_batch_fails_clearly(params):
    opt = make_optimizer(OptimizerSettings(1e-3))
    step = make_grpo_step(CFG, opt, micro_batch_size=3, loss_settings=LossSettings(kl_coef=0.0))
    with pytest.raises(ValueError, match="micro_batch_size=3"):
        step(init_train_state(params, opt), None, make_batch())
    batch = make_batch()
    del batch["loss_mask"]
    with pytest.raises(KeyError, match="loss_mask"):
        make_grpo_step(CFG, opt, loss_settings=LossSettings(kl_coef=0.0))(init_train_state(params, opt), None, batch)


def test_optimizer_warmup_and_decoupled_weight_decay():
    # Zero gradients isolate AdamW's decoupled decay: update = -lr(t) * weight_decay * p.
    p = {"w": jnp.array([1.0, -2.0])}
    zero = {"w": jnp.zeros(2)}
    settings = OptimizerSettings(0.1, warmup_steps=2, weight_decay=0.5)
    opt = make_optimizer(settings)
    s = opt.init(p)
    lrs = []
    for _ in range(4):
        u, s = opt.update(zero, s, p)
        lrs.append(float(-u["w"][0] / (0.5 * p["w"][0])))
    np.testing.assert_allclose(lrs, [0.0, 0.05, 0.1, 0.1], rtol=1e-6)
    # The logged rate of the n-th update is the one optax applied.
    np.testing.assert_allclose([settings.applied_lr(n) for n in range(1, 5)], lrs, rtol=1e-6)
    with pytest.raises(ValueError, match="learning_rate"):
        make_optimizer(OptimizerSettings(0.0))
