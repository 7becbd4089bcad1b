"""The GRPO update: `TrainState` and one jitted, sharded optimizer step (the optimizer: `optimizer.py`).

One step takes a mini-batch, splits it into micro-batches and runs them under `lax.scan`,
accumulating parameter gradients of the *un-normalised* loss sums plus the (sum, count)
loss terms; it divides once at the end, so any micro-batch size gives the one-big-batch
loss and gradient. Reference log-probs are computed inside the same jit from frozen
(stop-gradient, optimizer-free) reference params, which live outside the state.

With LoRA (`settings.LoraSettings`, `models/lora.py`) the state's params are the adapters alone
(so are the optimizer moments and the gradients), and the step's second argument is the frozen
base: the policy is the base with the adapters attached, the reference the same base without
them, in the same jit, with no second copy of the model.

Batch layout (a dict of arrays, rows = sequences):
  input_ids [B, T] int: left-padded prompt followed by the completion (right-padded);
  attention_mask [B, T]: 1 real token, 0 padding;
  loss_mask [B, T]: 1 on completion tokens that enter the loss;
  advantages [B] float;
  old_logprobs [B, T] (optional): sampler / pre-update log-probs aligned with input_ids;
    when absent the step is on-policy (old = stop_gradient(current), ratio exactly 1).
Log-probs are aligned with input_ids: entry t is log p(input_ids[t] | input_ids[:t]).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tooln1_jax.grpo import (
    DEFAULT_LOSS,
    LossSettings,
    LossTerms,
    combine_terms,
    empty_terms,
    finalize_terms,
    grpo_loss_terms,
    token_logprobs,
)
from tooln1_jax.models import ModelConfig, hidden_states, lm_head_weight, param_shapes, param_sharding
from tooln1_jax.models.lora import adapter_shapes, adapter_sharding, attach
from tooln1_jax.settings import LoraSettings
from tooln1_jax.sharding import TRAIN_RULES, ShardingRules, batch_sharding, fit_axes

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask", "advantages")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimizer updates applied (skipped non-finite steps not counted)
    params: Any
    opt_state: Any


def lora_on(lora: LoraSettings | None) -> bool:
    return lora is not None and lora.enabled


def trainable_shapes(model_config: ModelConfig, lora: LoraSettings | None = None) -> Any:
    """The shapes of what the optimizer trains: the adapters with LoRA, else the params."""
    return adapter_shapes(model_config, lora) if lora_on(lora) else param_shapes(model_config)


def trainable_sharding(
    model_config: ModelConfig, mesh: Mesh, rules: ShardingRules = TRAIN_RULES, lora: LoraSettings | None = None
) -> Any:
    """The `NamedSharding` tree of what the optimizer trains (`trainable_shapes`)."""
    return (
        adapter_sharding(model_config, lora, mesh, rules)
        if lora_on(lora)
        else param_sharding(model_config, mesh, rules)
    )


def state_sharding(
    model_config: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: ShardingRules = TRAIN_RULES,
    lora: LoraSettings | None = None,
) -> TrainState:
    """A TrainState of `NamedSharding`: params (the adapters with LoRA) by `rules`, optimizer
    moments like their params, counters replicated."""
    p_sh = trainable_sharding(model_config, mesh, rules, lora)
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
        trainable_shapes(model_config, lora),
        is_leaf=lambda x: isinstance(x, tuple),
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = optax.tree_map_params(
        optimizer,
        lambda _, sh: sh,
        jax.eval_shape(optimizer.init, abstract),
        p_sh,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(step=replicated, params=p_sh, opt_state=opt_sh)


def abstract_params(model_config: ModelConfig, mesh: Mesh, dtype, rules: ShardingRules = TRAIN_RULES) -> Any:
    """The params tree as `jax.ShapeDtypeStruct`s placed by `rules` (a restore target; no arrays made)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s, jnp.dtype(dtype), sharding=sh),
        param_shapes(model_config),
        param_sharding(model_config, mesh, rules),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def init_train_state(
    params: Any,
    optimizer: optax.GradientTransformation,
    *,
    model_config: ModelConfig | None = None,
    mesh: Mesh | None = None,
    rules: ShardingRules = TRAIN_RULES,
    lora: LoraSettings | None = None,
) -> TrainState:
    """A fresh TrainState of `params` (the adapters with LoRA); with a mesh (and model_config)
    everything is placed by `state_sharding`."""
    init = lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p))
    if mesh is None:
        return jax.jit(init)(params)
    if model_config is None:
        raise ValueError("init_train_state with a mesh needs model_config")
    sh = state_sharding(model_config, optimizer, mesh, rules, lora)
    return jax.jit(init, in_shardings=(sh.params,), out_shardings=sh)(params)


def reference_params(params: Any, dtype=None) -> Any:
    """A frozen copy of `params` (optionally cast, e.g. to bfloat16 to halve its memory).
    Always a new buffer: the train step donates the state, so the reference must not alias it."""
    return jax.tree.map(lambda x: x.astype(dtype) if dtype is not None else jnp.copy(x), params)


# ----------------------------------------------------------------------------- log-probs of a model


def sequence_logprobs(
    model_config: ModelConfig,
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    temperature: float,
    chunk_size: int = 128,
    completion_len: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """input_ids, attention_mask [B, T] -> (logprobs [B, T], entropy [B, T]) float32, aligned with
    input_ids (entry t predicts token t; entry 0 is 0). With `completion_len` C only the last C
    entries are computed (the rest are 0), skipping the prompt's share of the vocab projection."""
    b, t = input_ids.shape
    hidden = hidden_states(model_config, params, input_ids, attention_mask)
    start = 1 if completion_len is None else t - completion_len
    if not 1 <= start < t:
        raise ValueError(f"completion_len={completion_len} must be in [1, seq_len - 1 = {t - 1}]")
    lp, ent = token_logprobs(
        hidden[:, start - 1 : t - 1],
        lm_head_weight(params),
        input_ids[:, start:],
        temperature=temperature,
        chunk_size=chunk_size,
    )
    pad = ((0, 0), (start, 0))
    return jnp.pad(lp, pad), jnp.pad(ent, pad)


def _split_micro(batch: dict, micro_batch_size: int, mesh: Mesh | None, rules: ShardingRules) -> dict:
    """Each leaf [B, ...] -> [B // m, m, ...]. Micro-batch j takes rows j, j + n, j + 2n, ...
    so that, with the batch split contiguously over devices, every micro-batch spans all of
    them and the reshape moves no data."""
    b = batch["input_ids"].shape[0]
    if b % micro_batch_size:
        raise ValueError(f"batch size {b} is not a multiple of micro_batch_size={micro_batch_size}")
    n = b // micro_batch_size

    def split(x):
        x = x.reshape(micro_batch_size, n, *x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            axes = fit_axes(rules.mesh_axes("batch"), micro_batch_size, mesh)
            spec = PartitionSpec(None, axes or None, *([None] * (x.ndim - 2)))
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        return x

    return jax.tree.map(split, batch)


def grad_sums(
    model_config: ModelConfig,
    params: Any,
    ref_params: Any,
    micro: dict,
    init: tuple[Any, LossTerms] | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int = 128,
    completion_len: int | None = None,
    loss_settings: LossSettings = DEFAULT_LOSS,
    lora: LoraSettings | None = None,
) -> tuple[Any, LossTerms]:
    """(gradient sums, loss terms) of the *un-normalised* GRPO loss over micro-batches `micro`
    (every leaf [n, m, ...]), run under `lax.scan` and added to `init` (default zeros).
    Traceable, not jitted; `normalized_grads` divides once. The one description of a
    micro-batch's gradient, for the scanned step and for the length-bucketed update."""
    kl_coef = loss_settings.kl_coef
    if (kl_coef != 0 or lora_on(lora)) and ref_params is None:
        raise ValueError("kl_coef != 0 needs ref_params" if not lora_on(lora) else "LoRA needs the frozen base")
    lp_fn = functools.partial(
        sequence_logprobs, model_config, temperature=temperature, chunk_size=chunk_size, completion_len=completion_len
    )
    frozen = None if ref_params is None else jax.lax.stop_gradient(ref_params)
    policy = (lambda p: attach(frozen, p, lora)) if lora_on(lora) else (lambda p: p)
    frozen_ref = None if kl_coef == 0 else frozen

    def micro_loss(p, mb, ref_lp):
        lp, ent = lp_fn(policy(p), mb["input_ids"], mb["attention_mask"])
        old = mb["old_logprobs"] if "old_logprobs" in mb else jax.lax.stop_gradient(lp)
        terms = grpo_loss_terms(lp, old, ref_lp, mb["advantages"], mb["loss_mask"], entropy=ent, settings=loss_settings)
        return terms.loss_sum, terms

    def body(carry, mb):
        grads, terms = carry
        ref_lp = (
            None
            if frozen_ref is None
            else jax.lax.stop_gradient(lp_fn(frozen_ref, mb["input_ids"], mb["attention_mask"])[0])
        )
        (_, mb_terms), mb_grads = jax.value_and_grad(micro_loss, has_aux=True)(params, mb, ref_lp)
        return (jax.tree.map(jnp.add, grads, mb_grads), combine_terms(terms, mb_terms)), None

    if init is None:
        init = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), empty_terms())
    sums, _ = jax.lax.scan(body, init, micro)
    return sums


def normalized_grads(sums: Any, terms: LossTerms, params: Any) -> tuple[jax.Array, Any, dict]:
    """(loss, gradients in the params' dtypes, metrics) from `grad_sums`: one division by the
    whole batch's normaliser, so any split into micro-batches gives the one-batch result."""
    loss, metrics = finalize_terms(terms)
    norm = terms.normalizer
    scale = jnp.where(norm != 0, 1.0 / jnp.where(norm != 0, norm, 1.0), 0.0)
    return loss, jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), sums, params), metrics


def loss_and_grads(
    model_config: ModelConfig,
    params: Any,
    ref_params: Any,
    batch: dict,
    *,
    micro_batch_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int = 128,
    completion_len: int | None = None,
    mesh: Mesh | None = None,
    rules: ShardingRules = TRAIN_RULES,
    loss_settings: LossSettings = DEFAULT_LOSS,
    lora: LoraSettings | None = None,
) -> tuple[jax.Array, Any, dict]:
    """GRPO loss, its gradient w.r.t. `params`, and metrics for one mini-batch (traceable; not
    jitted here): `grad_sums` over its micro-batches, then `normalized_grads`. With LoRA,
    `params` are the adapters and `ref_params` the frozen base (needed even when kl_coef is 0):
    the policy is the base with the adapters attached, the reference the base alone."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"GRPO batch is missing {missing}; it has {sorted(batch)}")
    micro = _split_micro(batch, micro_batch_size or batch["input_ids"].shape[0], mesh, rules)
    sums, terms = grad_sums(
        model_config,
        params,
        ref_params,
        micro,
        temperature=temperature,
        chunk_size=chunk_size,
        completion_len=completion_len,
        loss_settings=loss_settings,
        lora=lora,
    )
    return normalized_grads(sums, terms, params)


def apply_grads(
    optimizer: optax.GradientTransformation, state: TrainState, loss: jax.Array, grads: Any, metrics: dict
) -> tuple[TrainState, dict]:
    """One optimizer step (traceable). A non-finite loss or gradient norm applies nothing
    (params, optimizer state and step stay) and sets metrics["finite"] to False; metrics gain
    grad_norm (before clipping), finite and step."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep_if_finite = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(
        step=state.step + finite.astype(jnp.int32),
        params=keep_if_finite(new_params, state.params),
        opt_state=keep_if_finite(new_opt_state, state.opt_state),
    )
    return new_state, dict(metrics, grad_norm=grad_norm, finite=finite, step=new_state.step)


def make_grpo_step(
    model_config: ModelConfig,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    rules: ShardingRules = TRAIN_RULES,
    micro_batch_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int = 128,
    completion_len: int | None = None,
    donate: bool = True,
    loss_settings: LossSettings = DEFAULT_LOSS,
    lora: LoraSettings | None = None,
):
    """A jitted `(state, ref_params, batch) -> (state, metrics)`: one optimizer step on a
    mini-batch (see the module docstring for `batch`). `ref_params` may be bfloat16 (see
    `reference_params`) or None when kl_coef == 0; with LoRA, the state holds the adapters and
    `ref_params` is the frozen base (any dtype). With a mesh, state, reference and batch
    are sharded by `rules` (put the batch with `shard_batch`); the state is donated.
    With `completion_len` C, log-probs are computed for the last C positions only, so the
    loss mask must be 0 before them (true when C >= the longest completion).

    A non-finite loss or gradient norm applies no update (`apply_grads`). Metrics: those of
    `grpo_loss` plus grad_norm (before clipping), finite, step.
    """

    def step(state: TrainState, ref_params, batch: dict):
        loss, grads, metrics = loss_and_grads(
            model_config,
            state.params,
            ref_params,
            batch,
            micro_batch_size=micro_batch_size,
            temperature=temperature,
            chunk_size=chunk_size,
            completion_len=completion_len,
            mesh=mesh,
            rules=rules,
            loss_settings=loss_settings,
            lora=lora,
        )
        return apply_grads(optimizer, state, loss, grads, metrics)

    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    state_sh = state_sharding(model_config, optimizer, mesh, rules, lora)
    # kl_coef == 0: the reference is None (an empty pytree), so its sharding must be None too.
    ref_sh = param_sharding(model_config, mesh, rules) if loss_settings.kl_coef != 0 or lora_on(lora) else None
    batch_sh = batch_sharding(mesh, rules, 1, micro_batch_size)  # a prefix: splits every leaf's rows
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_sh, ref_sh, batch_sh),
        out_shardings=(state_sh, replicated),
        donate_argnums=donate_argnums,
    )


def shard_batch(
    batch: dict, mesh: Mesh, rules: ShardingRules = TRAIN_RULES, micro_batch_size: int | None = None
) -> dict:
    """Places a batch dict (numpy or jax arrays, rows first) as `make_grpo_step` expects."""
    return jax.device_put(batch, batch_sharding(mesh, rules, 1, micro_batch_size))


@functools.partial(
    jax.jit, static_argnames=("model_config", "temperature", "chunk_size", "completion_len", "micro_batch_size")
)
def compute_logprobs(
    model_config: ModelConfig,
    params: Any,
    batch: dict,
    temperature: float,
    chunk_size: int = 128,
    completion_len: int | None = None,
    micro_batch_size: int | None = None,
) -> jax.Array:
    """Log-probs [B, T] float32 of `batch["input_ids"]` under params (old or reference
    log-probs), aligned with input_ids, with no gradient. `micro_batch_size` bounds memory by
    running the rows in groups under `lax.map`."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, t = ids.shape
    m = micro_batch_size or b
    if b % m:
        raise ValueError(f"batch size {b} is not a multiple of micro_batch_size={m}")
    fn = lambda x: sequence_logprobs(
        model_config, params, x[0], x[1], temperature=temperature, chunk_size=chunk_size, completion_len=completion_len
    )[0]
    # Strided groups (as in `_split_micro`): each group spans every device holding rows.
    group = lambda x: x.reshape(m, b // m, t).swapaxes(0, 1)
    out = jax.lax.map(fn, (group(ids), group(mask)))
    return jax.lax.stop_gradient(out.swapaxes(0, 1).reshape(b, t))
