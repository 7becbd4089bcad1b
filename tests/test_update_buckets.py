"""The update's compiled programs: one `accumulate` per (prompt bucket, completion bucket) pair,
one `zeros` and one `apply`, and none after the buckets are seen; and the groups it trains on."""

import dataclasses
import types

import jax
import numpy as np

from tooln1_jax.config import default_config
from tooln1_jax.grpo import nonzero_std_groups
from tooln1_jax.iteration import Progress, apply_updates, grpo_program, trained_groups
from tooln1_jax.models import ModelConfig, init_params
from tooln1_jax.rollouts import RolloutBatch
from tooln1_jax.sharding import make_mesh
from tooln1_jax.train_step import init_train_state

CFG = ModelConfig(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8
)
P, MAX_NEW, ROWS = 32, 64, 4
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def rollout_of(lengths, prompt_lengths, rng) -> RolloutBatch:
    """A [rows, P + MAX_NEW] rollout batch (groups of 2) whose prompts and completions have these lengths."""
    ROWS = len(lengths)
    lengths = np.asarray(lengths, np.int32)
    cols = np.arange(MAX_NEW)[None]
    done = (cols < lengths[:, None]).astype(np.int32)
    prompt = (np.arange(P)[None] >= P - np.asarray(prompt_lengths)[:, None]).astype(np.int32)
    ids = np.concatenate([prompt, rng.integers(1, CFG.vocab_size, (ROWS, MAX_NEW)) * done], 1).astype(np.int32)
    attn = np.concatenate([prompt, done], 1)
    loss = np.concatenate([np.zeros((ROWS, P)), done], 1).astype(np.float32)
    old = np.where(loss == 1, -4.0, 0.0).astype(np.float32)
    rewards = np.array([0, 1] * (ROWS // 2), np.float32)
    return RolloutBatch(
        ids, attn, loss, old, rewards, rewards, [""] * ROWS, [""] * ROWS, lengths, done[:, -1] == 0, P, 2
    )


def test_update_compiles_once_per_bucket_pair():
    config = default_config()
    config.rollout.update(num_samples=2, max_new_tokens=MAX_NEW)
    config.rl.update(train_batch_size=2, mini_batch_size=2, kl_coef=0.0)
    setup = types.SimpleNamespace(model_config=CFG, mesh=make_mesh(data=1, fsdp=1, tensor=1))
    program = grpo_program(config, setup)
    state = init_train_state(init_params(CFG, jax.random.key(0)), program.optimizer, model_config=CFG, mesh=setup.mesh)
    progress = Progress(state, None, 0, 0)
    compiled = []
    listener = lambda event, _secs, **kw: compiled.append(kw.get("fun_name")) if event == BACKEND_COMPILE else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    # programs loaded from JAX's persistent cache (on once any test ran `setup_run`) are not
    # compiled: keep this test's out of it, so every run counts real compiles
    min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    rng, new_per_batch = np.random.default_rng(0), []
    # (longest completion, longest prompt): completions 5, 12 -> bucket 16; 30, 17 -> 32;
    # 60, 33, 64 -> 64 (= max_new_tokens); prompts 10 -> 16; 20, 32 -> 32 (= the prompt width)
    shapes = [(5, 10), (30, 10), (12, 10), (60, 20), (17, 10), (33, 20), (64, 32), (5, 20), (30, 10)]
    try:
        for longest, longest_prompt in shapes:
            before = compiled.count("jit(accumulate)")
            lengths = [longest] + [1 + longest // 3] * (ROWS - 1)
            batch = rollout_of(lengths, [longest_prompt] + [3] * (ROWS - 1), rng)
            advantages = np.array([-1, 1] * (ROWS // 2), np.float32)
            metrics = apply_updates(config, program, progress, batch, advantages, np.arange(ROWS // 2))
            assert len(metrics) == 1 and bool(metrics[0]["finite"])
            new_per_batch.append(compiled.count("jit(accumulate)") - before)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
    # new pairs: (16, 16), (16, 32), (32, 64), (32, 16)
    assert new_per_batch == [1, 1, 0, 1, 0, 0, 0, 1, 0], (new_per_batch, compiled)
    assert compiled.count("jit(zeros)") == 1 and compiled.count("jit(apply)") == 1, compiled
    assert progress.num_updates == 9


def test_trained_groups_are_the_first_with_reward_spread():
    rewards = np.array([0, 0, 0, 1, 1, 1, 1, 0, 0, 1], np.float32)  # groups of 2: spread in groups 1, 3, 4
    spread = np.asarray(nonzero_std_groups(rewards, 2))
    assert trained_groups(spread, 2, informative_only=True).tolist() == [1, 3]
    assert trained_groups(spread, 8, informative_only=True).tolist() == [1, 3, 4]
    assert trained_groups(spread, 2, informative_only=False).tolist() == [0, 1]
    assert trained_groups(np.zeros(3, bool), 3, informative_only=True).tolist() == []


def test_dropping_flat_groups_equals_masking_them():
    """DAPO's filter leaves the flat groups out of the update; the update is the one that keeps
    them with an empty loss mask, though its one mini-batch is then short and padded."""
    config = default_config()
    config.rollout.update(num_samples=2, max_new_tokens=MAX_NEW)
    config.rl.update(train_batch_size=4, mini_batch_size=4, kl_coef=0.0)
    setup = types.SimpleNamespace(model_config=CFG, mesh=make_mesh(data=1, fsdp=1, tensor=1))
    program = grpo_program(config, setup)
    assert program.update.micro_batch_size == 8  # the whole mini-batch: 2 kept groups pad to 8 rows
    rng = np.random.default_rng(1)
    batch = rollout_of([9, 20, 31, 5, 12, 40, 7, 3], [10, 20, 5, 30, 12, 8, 16, 4], rng)
    batch.rewards[:] = [0, 1, 1, 1, 1, 0, 0, 0]  # spread in groups 0 and 2
    advantages = np.array([-1, 1, 0, 0, 1, -1, 0, 0], np.float32)
    groups = trained_groups(np.array([True, False, True, False]), 4, informative_only=True)
    assert groups.tolist() == [0, 2]

    def one_update(batch, groups):
        state = init_train_state(
            init_params(CFG, jax.random.key(0)), program.optimizer, model_config=CFG, mesh=setup.mesh
        )
        progress = Progress(state, None, 0, 0)
        (metrics,) = apply_updates(config, program, progress, batch, advantages, groups)
        return progress.state.params, metrics

    dropped, m_dropped = one_update(batch, groups)
    flat_rows = np.repeat(np.isin(np.arange(4), groups, invert=True), 2)
    masked = dataclasses.replace(batch, loss_mask=np.where(flat_rows[:, None], 0.0, batch.loss_mask).astype(np.float32))
    kept, m_kept = one_update(masked, np.arange(4))
    assert float(m_dropped["num_seqs"]) == float(m_kept["num_seqs"]) == 4
    np.testing.assert_allclose(float(m_dropped["loss"]), float(m_kept["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(dropped), jax.tree.leaves(kept)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert any(
        np.abs(np.asarray(a) - np.asarray(b)).max() > 0
        for a, b in zip(jax.tree.leaves(dropped), jax.tree.leaves(init_params(CFG, jax.random.key(0))))
    )
