"""The length-bucketed update: micro-batches cut to their own buckets give the full-width
step's loss, metrics and update, on one device and on a mesh of 8; the plan covers every row
once and keeps every real token."""

import jax
import numpy as np
import optax
import pytest

from tooln1_jax.bucketed_update import make_bucketed_update, micro_batch_plan, update_on_real_lengths
from tooln1_jax.grpo import LossSettings
from tooln1_jax.models import ModelConfig, init_params, shard_params
from tooln1_jax.sharding import TRAIN_RULES, make_mesh
from tooln1_jax.train_step import init_train_state, make_grpo_step, reference_params

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8
)
B, P, C, MICRO = 8, 64, 64, 2
# prompts of 3 to 60 tokens (buckets 16, 32, 64), completions of 1 to 40 (16, 32, 64)
PROMPT_LENS = np.array([60, 3, 40, 17, 5, 33, 12, 16])
COMPLETION_LENS = np.array([2, 40, 9, 30, 1, 17, 16, 5])
OPT = optax.sgd(0.1)  # linear in the gradient, so the params compare as tightly as the gradients
KW = dict(temperature=0.7, chunk_size=8)


def make_batch() -> dict:
    rng = np.random.default_rng(0)
    cols = np.arange(P + C)[None]
    attn = ((cols >= P - PROMPT_LENS[:, None]) & (cols < P + COMPLETION_LENS[:, None])).astype(np.int32)
    loss_mask = ((cols >= P) & (attn == 1)).astype(np.float32)
    return dict(
        input_ids=np.where(attn == 1, rng.integers(1, CFG.vocab_size, (B, P + C)), 0).astype(np.int32),
        attention_mask=attn,
        loss_mask=loss_mask,
        advantages=rng.normal(size=B).astype(np.float32),
        old_logprobs=np.where(loss_mask == 1, -np.log(CFG.vocab_size) + rng.normal(scale=0.5, size=(B, P + C)), 0)
        .astype(np.float32),
    )  # fmt: skip


def test_plan_covers_every_row_once_and_keeps_every_real_token():
    plan = micro_batch_plan(PROMPT_LENS, COMPLETION_LENS, MICRO, P, P + C)
    assert sorted(np.concatenate([mb.rows for mb in plan]).tolist()) == list(range(B))
    for mb in plan:
        assert np.all(PROMPT_LENS[mb.rows] <= mb.prompt_cols) and np.all(COMPLETION_LENS[mb.rows] <= mb.completion_cols)
    # ordered by prompt length: the 3- and 5-token prompts share a 16-column micro-batch
    assert [(mb.prompt_cols, mb.completion_cols) for mb in plan] == [(16, 64), (16, 16), (64, 32), (64, 16)]
    kept = sum(MICRO * (mb.prompt_cols + mb.completion_cols) for mb in plan)
    assert kept < 0.6 * B * (P + C)
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size=3"):
        micro_batch_plan(PROMPT_LENS, COMPLETION_LENS, 3, P, P + C)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.mark.parametrize(
    "on_mesh, kl_coef, aggregation", [(False, 0.0, "token_mean"), (True, 0.05, "seq_mean_token_sum_norm")]
)
def test_bucketed_update_equals_the_full_width_step(on_mesh, kl_coef, aggregation):
    # Dr. GRPO with its constant pinned to max_new_tokens, as the trainer does
    params, batch = init_params(CFG, jax.random.key(0)), make_batch()
    ref = reference_params(init_params(CFG, jax.random.key(1))) if kl_coef else None
    settings = LossSettings(kl_coef=kl_coef, kl_estimator="k3", aggregation=aggregation, norm_constant=float(C))
    step = make_grpo_step(CFG, OPT, micro_batch_size=MICRO, completion_len=C, loss_settings=settings, **KW)
    want_state, want = step(init_train_state(params, OPT), ref, batch)

    mesh = make_mesh(data=2, fsdp=2, tensor=2) if on_mesh else None
    update = make_bucketed_update(CFG, OPT, micro_batch_size=MICRO, mesh=mesh, loss_settings=settings, **KW)
    state = init_train_state(params, OPT, model_config=CFG, mesh=mesh)
    if on_mesh and ref is not None:
        ref = reference_params(shard_params(ref, CFG, mesh, TRAIN_RULES))
    state, got = update_on_real_lengths(update, state, ref, batch, P)
    assert int(state.step) == 1 and bool(got["finite"])
    assert float(got["num_tokens"]) == float(COMPLETION_LENS.sum())
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for (path, x), y in zip(jax.tree.leaves_with_path(_host(state.params)), jax.tree.leaves(_host(want_state.params))):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    if on_mesh:
        assert state.params["layers"]["q_proj"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_a_missing_batch_key_is_named():
    update = make_bucketed_update(CFG, OPT, micro_batch_size=MICRO)
    batch = make_batch()
    del batch["advantages"]
    with pytest.raises(KeyError, match="missing \\['advantages'\\]"):
        update_on_real_lengths(update, init_train_state(init_params(CFG, jax.random.key(0)), OPT), None, batch, P)
