"""What a GRPO checkpoint records beside its arrays, and the checks a resumed run makes.

A run resumed from its latest checkpoint repeats the uninterrupted run exactly when it restores
the same step on every process and runs the same config; `agreed_step` and
`check_resumed_config` check those two, before any step runs.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from tooln1_jax import distributed
from tooln1_jax.checkpoint import CheckpointReadError
from tooln1_jax.config import ConfigError
from tooln1_jax.models import ModelConfig, abstract_params
from tooln1_jax.models.lora import abstract_adapters
from tooln1_jax.settings import LoraSettings
from tooln1_jax.sharding import TRAIN_RULES
from tooln1_jax.train_step import TrainState, lora_on, state_sharding

# Config fields that change what a resumed run computes: a difference is warned about, or refused.
RUN_DEFINING = (
    "seed",
    "model.",
    "lora.",
    "tokenizer.",
    "data.",
    "rl.train_batch_size",
    "rl.rollout_batch_size",
    "rl.filter_zero_std_groups",
    "rl.mini_batch_size",
    "rl.micro_batch_size",
    "rl.ppo_epochs",
    "rollout.num_samples",
    "rollout.max_new_tokens",
    "optim.",
    "sft.",
)


def abstract_train_state(
    model_config: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    param_dtype,
    lora: LoraSettings | None = None,
) -> TrainState:
    """Shapes, dtypes and shardings of a TrainState (a restore target), with no arrays made. With
    LoRA its params are the float32 adapters (`param_dtype` is the base's, which is not in it)."""
    shardings = state_sharding(model_config, optimizer, mesh, TRAIN_RULES, lora)
    if lora_on(lora):
        params = abstract_adapters(model_config, lora, mesh, TRAIN_RULES)
    else:
        params = abstract_params(model_config, mesh, param_dtype, TRAIN_RULES)
    opt_state = jax.eval_shape(optimizer.init, params)
    opt_state = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), opt_state, shardings.opt_state
    )
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)


def checkpoint_meta(
    config, model_config: ModelConfig, *, step: int, num_updates: int, data_position: dict, sft_summary: dict | None
) -> dict:
    """What a checkpoint records beside the arrays (JSON-safe): step, updates, seed, the data
    position of the next step, the model and run configs, and the SFT warm start's summary."""
    meta = {
        "step": step,
        "num_updates": num_updates,
        "seed": int(config.seed),
        "data_position": data_position,
        "model_config": dataclasses.asdict(model_config),
        "config": config.to_dict(),
        "sft": sft_summary,
    }
    return json.loads(json.dumps(meta, default=str))


def agreed_step(step: int) -> int:
    """The restored step, checked to be the same on every process (each reads the shared folder)."""
    steps = distributed.gather_ints(step)
    if len(set(steps)) > 1:
        raise CheckpointReadError(
            f"processes restored different checkpoints {steps}: some hosts cannot "
            "read the newest one; check the output_dir they share"
        )
    return step


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumed_config(config, saved: dict, is_main: bool) -> None:
    """Warns (or, with `resume.strict`, raises ConfigError) when a run-defining field differs
    from the checkpoint's config."""
    now, then = _flatten(config.to_dict()), _flatten(saved)
    diffs = [
        f"config.{k}: {then.get(k)!r} in the checkpoint, {now.get(k)!r} now"
        for k in sorted(set(now) | set(then))
        if any(k == f or (f.endswith(".") and k.startswith(f)) for f in RUN_DEFINING)
        and json.dumps(now.get(k), default=str) != json.dumps(then.get(k), default=str)
    ]
    if not diffs:
        return
    message = "resuming with a config that differs from the checkpoint's: " + "; ".join(diffs)
    if config.resume.strict:
        raise ConfigError(message + " (config.resume.strict=True)")
    if is_main:
        print(f"warning: {message}", file=sys.stderr, flush=True)
