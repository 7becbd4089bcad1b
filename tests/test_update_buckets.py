"""The update's compiled programs: one `accumulate` per (prompt bucket, completion bucket) pair,
one `zeros` and one `apply`, and none after the buckets are seen."""

import types

import jax
import numpy as np

from tooln1_jax.config import default_config
from tooln1_jax.iteration import Progress, apply_updates, grpo_program
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
    """A [ROWS, P + MAX_NEW] rollout batch whose prompts and completions have these lengths."""
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
            metrics = apply_updates(config, program, progress, batch, advantages, batch.loss_mask)
            assert len(metrics) == 1 and bool(metrics[0]["finite"])
            new_per_batch.append(compiled.count("jit(accumulate)") - before)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
    # new pairs: (16, 16), (16, 32), (32, 64), (32, 16)
    assert new_per_batch == [1, 1, 0, 1, 0, 0, 0, 1, 0], (new_per_batch, compiled)
    assert compiled.count("jit(zeros)") == 1 and compiled.count("jit(apply)") == 1, compiled
    assert progress.num_updates == 9
