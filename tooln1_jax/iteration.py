"""One GRPO iteration (a rollout batch and its optimizer updates) and what it needs: the data
order, the step's RNG, the run's compiled update program and the progress it advances.

Everything random is a function of (seed, step): the data order of epoch e is a permutation
seeded by (seed, e) and the sampling key of step s is fold_in(key(seed), s), so a resumed run
repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tooln1_jax import rollouts
from tooln1_jax.bucketed_update import BucketedUpdate, make_bucketed_update, update_on_real_lengths
from tooln1_jax.config import lora_settings, loss_settings, optimizer_settings, rollout_prompts
from tooln1_jax.grpo import LossSettings, group_advantages, nonzero_std_groups
from tooln1_jax.models import ModelConfig
from tooln1_jax.optimizer import OptimizerSettings, make_optimizer
from tooln1_jax.run_setup import RunSetup, policy_params
from tooln1_jax.settings import LoraSettings
from tooln1_jax.train_step import TrainState


class NonFiniteLossError(FloatingPointError):
    """A GRPO update produced a NaN/Inf loss or gradient; the run stopped without saving it."""


# ----------------------------------------------------------------------------- data order and RNG


def step_prompt_indices(seed: int, step: int, num_train: int, batch_size: int) -> tuple[int, int, np.ndarray]:
    """(data epoch, index into that epoch's shuffled order, [batch_size] prompt indices) of `step`.
    Each epoch covers num_train // batch_size whole batches of a permutation seeded by (seed, epoch)."""
    per_epoch = num_train // batch_size
    data_epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, data_epoch]).permutation(num_train)
    start = index * batch_size
    return data_epoch, start, order[start : start + batch_size]


def step_rng(seed: int, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), step)


# ----------------------------------------------------------------------------- the update program


@dataclasses.dataclass(frozen=True)
class GrpoProgram:
    """The optimizer and the jitted GRPO update of a run (`bucketed_update`: each micro-batch
    cut to the length buckets of its own rows, one optimizer step per mini-batch).
    `update.micro_batch_size` counts sequences per gradient-accumulation chunk (also the unit the
    batch sharding must divide). With `lora` enabled the update trains adapters on the frozen base
    (`train_step`)."""

    optimizer: optax.GradientTransformation
    update: BucketedUpdate
    optimizer_settings: OptimizerSettings
    lora: LoraSettings


@functools.lru_cache(maxsize=8)
def _grpo_program(
    model_config: ModelConfig,
    mesh,
    optim: OptimizerSettings,
    loss: LossSettings,
    micro_batch_size: int,
    temperature: float,
    lora: LoraSettings,
) -> GrpoProgram:
    """Cached on hashable settings: runs in one process (tests, notebooks, resume) reuse the
    compiled programs instead of compiling them again."""
    optimizer = make_optimizer(optim)
    update = make_bucketed_update(
        model_config,
        optimizer,
        mesh=mesh,
        micro_batch_size=micro_batch_size,
        temperature=temperature,
        loss_settings=loss,
        lora=lora,
    )
    return GrpoProgram(optimizer, update, optim, lora)


def grpo_program(config, setup: RunSetup) -> GrpoProgram:
    """The run's optimizer and GRPO steps, from `config.optim`, `config.rl`, `config.rollout` and
    `config.lora`. Dr. GRPO's per-sequence constant is max_new_tokens (the generation budget),
    not a width, since the update cuts each micro-batch to its rows' real lengths."""
    rl, ro = config.rl, config.rollout
    micro = int(rl.micro_batch_size) or int(rl.mini_batch_size * ro.num_samples)
    return _grpo_program(
        setup.model_config,
        setup.mesh,
        optimizer_settings(config),
        dataclasses.replace(loss_settings(config), norm_constant=float(ro.max_new_tokens)),
        micro,
        float(ro.temperature),
        lora_settings(config),
    )


@dataclasses.dataclass
class Progress:
    """What the loop carries from step to step: the train state, the frozen reference (None
    when kl_coef is 0; with LoRA, the frozen base, which is the reference too), rollout batches
    done and optimizer updates applied."""

    state: TrainState
    ref: Any
    step: int
    num_updates: int


# ----------------------------------------------------------------------------- one iteration


def trained_groups(spread: np.ndarray, train_batch_size: int, informative_only: bool) -> np.ndarray:
    """Indices of the groups the update trains on (spread: bool [groups], True where a group's
    rewards differ), in rollout order: the first `train_batch_size`, or with `informative_only`
    (DAPO's dynamic sampling) the first `train_batch_size` with spread. A group of equal rewards
    has zero advantage everywhere, so it is left out rather than computed with its loss masked."""
    groups = np.flatnonzero(spread) if informative_only else np.arange(len(spread))
    return groups[:train_batch_size]


def _update_batches(
    rollout: rollouts.RolloutBatch,
    groups: np.ndarray,
    advantages: np.ndarray,
    mini_batch_size: int,
    micro_batch_size: int,
    ppo_epochs: int,
    rng: np.random.Generator,
):
    """Yields (ppo pass, mini-batch dict) for every update on the rollout's `groups`. Groups stay
    together; the first pass keeps their order, later passes reshuffle them. A short last
    mini-batch is padded to a multiple of `micro_batch_size` rows with rows whose loss mask is
    empty, which add nothing to the loss sums or to their normaliser (`grpo.grpo_loss_terms`)."""
    n = rollout.num_samples
    for ppo_pass in range(ppo_epochs):
        order = groups if ppo_pass == 0 else rng.permutation(groups)
        for start in range(0, len(order), mini_batch_size):
            rows = (order[start : start + mini_batch_size, None] * n + np.arange(n)).reshape(-1)
            loss_mask = rollout.loss_mask[rows]
            pad = -len(rows) % micro_batch_size
            if pad:
                rows = np.concatenate([rows, np.full(pad, rows[0])])
                loss_mask = np.concatenate([loss_mask, np.zeros((pad, loss_mask.shape[1]), loss_mask.dtype)])
            yield (
                ppo_pass,
                {
                    "input_ids": rollout.input_ids[rows],
                    "attention_mask": rollout.attention_mask[rows],
                    "loss_mask": loss_mask,
                    "advantages": advantages[rows],
                    "old_logprobs": rollout.old_logprobs[rows],
                },
            )


_MEAN_KEYS = (
    "loss",
    "policy_loss",
    "kl",
    "entropy",
    "clip_frac",
    "clip_frac_low",
    "clip_frac_high",
    "ratio_mean",
    "grad_norm",
)


def _combine_update_metrics(updates: list[dict]) -> dict:
    if not updates:  # no group to train on: the metrics of an empty batch (`grpo.finalize_terms`)
        return {**{k: 0.0 for k in _MEAN_KEYS}, "ratio_min": 1.0, "ratio_max": 1.0, "first_ratio_max_dev": 0.0}
    out = {k: float(np.mean([u[k] for u in updates])) for k in _MEAN_KEYS}
    out["ratio_min"] = float(min(u["ratio_min"] for u in updates))
    out["ratio_max"] = float(max(u["ratio_max"] for u in updates))
    first = updates[0]
    out["first_ratio_max_dev"] = float(max(abs(first["ratio_max"] - 1.0), abs(first["ratio_min"] - 1.0)))
    return out


def apply_updates(
    config,
    program: GrpoProgram,
    progress: Progress,
    batch: rollouts.RolloutBatch,
    advantages: np.ndarray,
    groups: np.ndarray,
    last_checkpoint: Callable[[], int | None] = lambda: None,
) -> list[dict]:
    """Every optimizer update on the `groups` of one rollout batch (advantages [N]), applied to
    `progress`; their metrics. Each update runs its micro-batches cut to their own rows' length
    buckets (`bucketed_update`), so it costs what the real lengths need, not the padded width."""
    rl = config.rl
    shuffle_rng = np.random.default_rng([int(config.seed), progress.step, 1])
    metrics = []
    micro = program.update.micro_batch_size
    for ppo_pass, mb in _update_batches(
        batch, groups, advantages, rl.mini_batch_size, micro, rl.ppo_epochs, shuffle_rng
    ):
        state, m = update_on_real_lengths(program.update, progress.state, progress.ref, mb, batch.prompt_width)
        m = jax.device_get(m)
        if not bool(m["finite"]):
            raise NonFiniteLossError(
                f"step {progress.step + 1}: the GRPO update {len(metrics) + 1} (ppo epoch {ppo_pass}) has a "
                f"non-finite loss={float(m['loss'])} / grad_norm={float(m['grad_norm'])}; the run stops here "
                f"with nothing saved from this step (last checkpoint: {last_checkpoint()}). Lower "
                "config.optim.lr or check the data and the reward."
            )
        progress.state = state
        progress.num_updates += 1
        metrics.append(m)
    return metrics


def grpo_iteration(
    config,
    setup: RunSetup,
    program: GrpoProgram,
    progress: Progress,
    last_checkpoint: Callable[[], int | None] = lambda: None,
) -> dict:
    """One rollout batch and its updates: advances `progress` by one step and returns the step's
    metrics row (rollout summary, reward spread, update metrics, learning rate, timings)."""
    rl, ro = config.rl, config.rollout
    t0 = time.perf_counter()
    data_epoch, _, idx = step_prompt_indices(
        int(config.seed), progress.step, len(setup.train_records), rollout_prompts(config)
    )
    batch = rollouts.generate_and_score(
        setup.model_config,
        policy_params(config, setup.model_config, progress.state.params, progress.ref, setup.mesh),
        setup.tokenizer,
        [setup.train_prompt_ids[i] for i in idx],
        [setup.train_records[i] for i in idx],
        num_samples=ro.num_samples,
        max_new_tokens=ro.max_new_tokens,
        temperature=ro.temperature,
        top_p=ro.top_p,
        top_k=ro.top_k,
        rng=step_rng(int(config.seed), progress.step),
        mesh=setup.mesh,
        reward_variant=rl.reward_variant,
        prompts_per_call=int(ro.prompts_per_call),
        decode_segments=int(ro.decode_segments),
    )
    t_rollout = time.perf_counter() - t0
    rewards = jnp.asarray(batch.rewards)
    advantages = np.asarray(group_advantages(rewards, ro.num_samples, unbiased=bool(rl.unbiased_std)), np.float32)
    spread = np.asarray(nonzero_std_groups(rewards, ro.num_samples))  # [groups]
    groups = trained_groups(spread, rl.train_batch_size, bool(rl.filter_zero_std_groups))

    t1 = time.perf_counter()
    updates = apply_updates(config, program, progress, batch, advantages, groups, last_checkpoint)
    progress.step += 1
    t_update = time.perf_counter() - t1
    step_time = time.perf_counter() - t0
    generated = float(np.sum(batch.lengths))
    return {
        **batch.summary(),
        "reward_std": float(np.std(batch.rewards)),
        "zero_std_group_frac": float(1.0 - np.mean(spread)),
        # The all-wrong part of it: problems no sample solves, which GRPO cannot learn from at all.
        "unsolved_group_frac": rollouts.group_coverage(batch.correct, ro.num_samples)["unsolved_frac"],
        "trained_groups": len(groups),
        **_combine_update_metrics(updates),
        "lr": program.optimizer_settings.applied_lr(progress.num_updates),
        "data_epoch": data_epoch,
        "num_updates": progress.num_updates,
        "tokens_per_s": generated / step_time,
        "rollout_tokens_per_s": generated / t_rollout,
        "step_time": step_time,
        "rollout_time": t_rollout,
        "update_time": t_update,
    }
