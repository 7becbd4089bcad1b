"""The GRPO update at the rows' real lengths: micro-batches of rows of similar length, each cut
to its own length buckets, their gradient sums added across calls, then one optimizer step.

`train_step.make_grpo_step` runs every micro-batch of a mini-batch at one width, the batch's.
With real prompts (Tool-N1's run from 300 to 2,700 tokens) and completions that stop early, that
pads most rows to the longest prompt and the longest completion of the whole batch. Here rows
are ordered by prompt length, then completion length, and each micro-batch keeps only the
columns its own rows fill: `sampling.length_bucket` of its longest prompt on the left and of its
longest completion on the right. A mini-batch then costs about its real tokens, and the update
compiles one `accumulate` program per (prompt bucket, completion bucket) pair it meets, at most
(log2(P / 16) + 1) * (log2(C / 16) + 1) of them, plus one `zeros` and one `apply`.

Exact: every removed column is padding (attention and loss mask 0), positions count real tokens
only, and the sums are divided once, by the whole mini-batch's normaliser (`normalized_grads`),
so the result is `make_grpo_step`'s on the full-width batch (tests/test_bucketed_update.py).
Every process holds every row (`rollouts`), so every process makes the same plan and runs the
same programs on the same global shapes, with no exchange.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tooln1_jax.grpo import DEFAULT_LOSS, LossSettings, LossTerms, empty_terms
from tooln1_jax.models import ModelConfig, param_sharding
from tooln1_jax.sampling import length_bucket
from tooln1_jax.settings import LoraSettings
from tooln1_jax.sharding import TRAIN_RULES, ShardingRules, batch_sharding
from tooln1_jax.train_step import (
    BATCH_KEYS,
    TrainState,
    apply_grads,
    grad_sums,
    lora_on,
    normalized_grads,
    shard_batch,
    state_sharding,
    trainable_sharding,
)


@flax.struct.dataclass
class GradSums:
    """What the micro-batches of one mini-batch have added so far."""

    grads: Any  # like the trainable params, float32: gradient of the un-normalised loss sum
    terms: LossTerms


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of a plan: its rows of the mini-batch and the columns it keeps on each side
    of the prompt/completion boundary."""

    rows: np.ndarray  # [m] int
    prompt_cols: int
    completion_cols: int


@dataclasses.dataclass(frozen=True)
class BucketedUpdate:
    """The three jitted programs of one update (see the module docstring):
    zeros(params) -> GradSums; accumulate(params, ref, micro-batch [m, W], sums, C) -> sums
    (donated), with log-probs on the last C columns; apply(state, sums) -> (state, metrics)
    (the state donated)."""

    zeros: Callable
    accumulate: Callable
    apply: Callable
    micro_batch_size: int
    mesh: Mesh | None
    rules: ShardingRules


def make_bucketed_update(
    model_config: ModelConfig,
    optimizer: optax.GradientTransformation,
    *,
    micro_batch_size: int,
    mesh: Mesh | None = None,
    rules: ShardingRules = TRAIN_RULES,
    temperature: float = 1.0,
    chunk_size: int = 128,
    loss_settings: LossSettings = DEFAULT_LOSS,
    lora: LoraSettings | None = None,
) -> BucketedUpdate:
    """The programs of a length-bucketed GRPO update; the arguments mean what they mean for
    `train_step.make_grpo_step`. With a mesh, state, reference, sums and micro-batches are
    sharded by `rules`; `micro_batch_size` rows is the unit the batch axes must divide."""

    def zeros(params):
        return GradSums(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), empty_terms())

    def accumulate(params, ref_params, micro_batch, sums, completion_len):
        one = jax.tree.map(lambda x: x[None], micro_batch)  # [1, m, ...]: a scan of one micro-batch
        grads, terms = grad_sums(
            model_config,
            params,
            ref_params,
            one,
            (sums.grads, sums.terms),
            temperature=temperature,
            chunk_size=chunk_size,
            completion_len=completion_len,
            loss_settings=loss_settings,
            lora=lora,
        )
        return GradSums(grads, terms)

    def apply(state: TrainState, sums: GradSums):
        loss, grads, metrics = normalized_grads(sums.grads, sums.terms, state.params)
        return apply_grads(optimizer, state, loss, grads, metrics)

    static = dict(static_argnums=(4,))
    if mesh is None:
        return BucketedUpdate(
            jax.jit(zeros),
            jax.jit(accumulate, donate_argnums=(3,), **static),
            jax.jit(apply, donate_argnums=(0,)),
            micro_batch_size,
            None,
            rules,
        )
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sh = state_sharding(model_config, optimizer, mesh, rules, lora)
    sums_sh = GradSums(trainable_sharding(model_config, mesh, rules, lora), replicated)
    # kl_coef == 0: the reference is None (an empty pytree), so its sharding must be None too.
    ref_sh = param_sharding(model_config, mesh, rules) if loss_settings.kl_coef != 0 or lora_on(lora) else None
    batch_sh = batch_sharding(mesh, rules, 1, micro_batch_size)
    return BucketedUpdate(
        jax.jit(zeros, in_shardings=(state_sh.params,), out_shardings=sums_sh),
        jax.jit(
            accumulate,
            in_shardings=(state_sh.params, ref_sh, batch_sh, sums_sh),
            out_shardings=sums_sh,
            donate_argnums=(3,),
            **static,
        ),
        jax.jit(apply, in_shardings=(state_sh, sums_sh), out_shardings=(state_sh, replicated), donate_argnums=(0,)),
        micro_batch_size,
        mesh,
        rules,
    )


def micro_batch_plan(
    prompt_lengths: np.ndarray, completion_lengths: np.ndarray, micro_batch_size: int, prompt_width: int, width: int
) -> list[MicroBatch]:
    """The micro-batches of a mini-batch of B rows (real prompt and completion lengths [B]) whose
    arrays are [B, width], prompts left-padded to `prompt_width` columns: rows ordered by prompt
    length, then completion length, `micro_batch_size` at a time, each with the length buckets
    of its own longest prompt and completion (capped at the batch's columns)."""
    b = len(prompt_lengths)
    if b % micro_batch_size:
        raise ValueError(f"batch size {b} is not a multiple of micro_batch_size={micro_batch_size}")
    order = np.lexsort((completion_lengths, prompt_lengths))
    return [
        MicroBatch(
            rows,
            length_bucket(int(np.max(prompt_lengths[rows])), cap=prompt_width),
            length_bucket(int(np.max(completion_lengths[rows])), cap=width - prompt_width),
        )
        for rows in order.reshape(-1, micro_batch_size)
    ]


def batch_plan(batch: dict, prompt_width: int, micro_batch_size: int) -> list[MicroBatch]:
    """`micro_batch_plan` of a batch dict (attention_mask [B, T], prompts left-padded to
    `prompt_width` columns), its lengths read from the mask."""
    mask, p = np.asarray(batch["attention_mask"]), prompt_width
    return micro_batch_plan(mask[:, :p].sum(1), mask[:, p:].sum(1), micro_batch_size, p, mask.shape[1])


def update_on_real_lengths(
    update: BucketedUpdate, state: TrainState, ref_params: Any, batch: dict, prompt_width: int
) -> tuple[TrainState, dict]:
    """One optimizer step on a mini-batch: numpy arrays as `train_step`'s module docstring lays
    out ([B, T] with the prompts left-padded to `prompt_width` columns, then the completions),
    run as `micro_batch_plan` says. -> (new state, metrics), those of `make_grpo_step`."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"GRPO batch is missing {missing}; it has {sorted(batch)}")
    plan = batch_plan(batch, prompt_width, update.micro_batch_size)
    sums = update.zeros(state.params)
    for mb in plan:
        cols = slice(prompt_width - mb.prompt_cols, prompt_width + mb.completion_cols)
        rows = {k: np.asarray(v)[mb.rows] for k, v in batch.items()}
        rows = {k: v if v.ndim == 1 else v[:, cols] for k, v in rows.items()}
        if update.mesh is not None:
            rows = shard_batch(rows, update.mesh, update.rules, update.micro_batch_size)
        sums = update.accumulate(state.params, ref_params, rows, sums, mb.completion_cols)
    return update.apply(state, sums)
