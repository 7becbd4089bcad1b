"""The GRPO training loop and its CLI.

    python -m tooln1_jax.train                                   # the demo (configs/tiny_cpu.py)
    python -m tooln1_jax.train --config configs/smollm2_135m_cpu.py --config.rl.kl_coef=0.0

One step (a rollout batch): take `rl.train_batch_size` prompts in a seeded per-epoch order,
sample `rollout.num_samples` completions each, score them with the rule-based reward, turn the
rewards into group advantages, then split the rows into mini-batches of `rl.mini_batch_size`
prompts, one optimizer update each, for `rl.ppo_epochs` passes. Held-out greedy accuracy every
`eval.every_steps`; a checkpoint every `checkpoint.every_steps` (and at the end).

Everything random is a function of (seed, step): the data order of epoch e is a permutation
seeded by (seed, e) and the sampling key of step s is fold_in(key(seed), s). So a run resumed
from its latest checkpoint repeats the uninterrupted run exactly. A non-finite loss stops the
run (`NonFiniteLossError`) before anything non-finite is saved.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
import types
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tooln1_jax import checkpoint as ckpt_lib
from tooln1_jax import cli, distributed, interrupt, rollouts
from tooln1_jax.config import ConfigError, total_rl_steps, validate_config
from tooln1_jax.data.prompt import encode_prompts
from tooln1_jax.data.records import DropCounts, ToolRecord, train_val_split
from tooln1_jax.grpo import group_advantages, nonzero_std_groups
from tooln1_jax.metrics import EVAL_FILE, MetricsLogger, read_jsonl
from tooln1_jax.models import ModelConfig, abstract_params, init_params, param_sharding, shard_params
from tooln1_jax.sharding import TRAIN_RULES, make_mesh
from tooln1_jax.train_step import (
    init_train_state,
    make_grpo_step,
    make_optimizer,
    reference_params,
    shard_batch,
    state_sharding,
    TrainState,
)


# Per-step metric keys (always present in metrics.jsonl).
STEP_METRICS = (
    "reward_mean", "reward_std", "accuracy", "format_failure_rate", "zero_std_group_frac",
    "response_length", "response_length_max", "truncated_frac",
    "loss", "policy_loss", "kl", "entropy", "clip_frac", "clip_frac_low", "clip_frac_high",
    "ratio_mean", "ratio_min", "ratio_max", "first_ratio_max_dev", "grad_norm",
    "lr", "epoch", "num_updates", "tokens_per_s", "rollout_tokens_per_s", "step_time",
    "rollout_time", "update_time",
)


class NonFiniteLossError(FloatingPointError):
    """A GRPO update produced a NaN/Inf loss or gradient; the run stopped without saving it."""


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass
class RunSetup:
    """What a run needs before its first step: mesh, tokenizer, model, and the data split.
    `train_prompt_ids[i]` is the encoded prompt of `train_records[i]` (over-long ones dropped)."""

    config: Any
    mesh: Any
    tokenizer: Any
    model_config: ModelConfig
    params: Any  # None when the run resumes from a checkpoint (restored later)
    train_records: list
    train_prompt_ids: list
    val_records: list
    drops: DropCounts


def build_tokenizer(config):
    t = config.tokenizer
    if t.kind == "tiny":
        from tooln1_jax.assets import default_cache_dir
        from tooln1_jax.data.tiny_tokenizer import load_or_build_tiny_tokenizer

        path = t.name_or_path or os.path.join(default_cache_dir(), f"tiny_tokenizer_{t.vocab_size}")
        return load_or_build_tiny_tokenizer(path, vocab_size=int(t.vocab_size))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(t.name_or_path or config.model.name_or_path)


def _synthetic_records(config) -> tuple[list[ToolRecord], DropCounts]:
    from tooln1_jax.data import synthetic
    from tooln1_jax.data.xlam import convert_rows

    knobs = dict(config.data.synthetic)
    num = int(knobs.pop("num_examples"))
    seed = int(knobs.pop("seed", config.seed))
    fields = {f.name for f in dataclasses.fields(synthetic.SyntheticConfig)}
    unknown = sorted(set(knobs) - fields)
    if unknown:
        raise ConfigError(f"config.data.synthetic has unknown fields {unknown}; known: "
                          f"num_examples, seed, {sorted(fields)}")
    sc = synthetic.SyntheticConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in knobs.items()})
    return convert_rows(synthetic.generate(num, sc, seed=seed), source="synthetic")


def load_records(config) -> tuple[list[ToolRecord], DropCounts]:
    """All records of `config.data.source`, with the counted drops of their conversion."""
    from tooln1_jax.data import sources

    d = config.data
    if d.source == "synthetic":
        return _synthetic_records(config)
    if d.source == "xlam":
        return sources.load_xlam(d.xlam_path)
    if d.source == "toolace":
        return sources.load_toolace(d.toolace_path)
    return sources.load_tool_n1_mix(d.xlam_path, d.toolace_path)


def _random_model_config(config, tokenizer) -> ModelConfig:
    r = config.model.random
    vocab = int(r.vocab_size) or len(tokenizer)
    return ModelConfig(
        vocab_size=vocab, hidden_size=r.hidden_size, intermediate_size=r.intermediate_size, num_layers=r.num_layers,
        num_heads=r.num_heads, num_kv_heads=r.num_kv_heads, head_dim=r.head_dim, rope_theta=float(r.rope_theta),
        tie_word_embeddings=bool(r.tie_word_embeddings), attention_bias=r.model_type == "qwen2",
        max_position_embeddings=r.max_position_embeddings, model_type=r.model_type,
        eos_token_id=tokenizer.eos_token_id, dtype=config.model.dtype, remat=config.model.remat,
    )


@functools.lru_cache(maxsize=8)
def _sharded_init(model_config: ModelConfig, param_dtype: str, mesh):
    """A jitted random init that writes each leaf straight onto its TRAIN_RULES sharding
    (cached, so repeated runs in one process compile it once)."""
    init = functools.partial(init_params, model_config, dtype=jnp.dtype(param_dtype))
    return jax.jit(init, out_shardings=param_sharding(model_config, mesh, TRAIN_RULES))


def build_model(config, tokenizer, mesh, *, load_weights: bool = True) -> tuple[ModelConfig, Any]:
    """(ModelConfig, params placed on the mesh under TRAIN_RULES). Without `load_weights`,
    params is None (a resumed run restores them from its checkpoint)."""
    if config.model.name_or_path:
        from tooln1_jax.models.hf_io import load_pretrained, resolve_checkpoint_dir

        if load_weights:
            model_config, params = load_pretrained(config.model.name_or_path, dtype=jnp.dtype(config.model.param_dtype),
                                                   mesh=mesh, rules=TRAIN_RULES, compute_dtype=config.model.dtype)
        else:
            folder = resolve_checkpoint_dir(config.model.name_or_path)
            model_config, params = ModelConfig.from_hf(folder, dtype=config.model.dtype), None
        model_config = model_config.replace(remat=config.model.remat)
    else:
        model_config = _random_model_config(config, tokenizer)
        params = None
        if load_weights:
            params = _sharded_init(model_config, config.model.param_dtype, mesh)(jax.random.key(config.seed))
    if len(tokenizer) > model_config.vocab_size:
        field = "config.model.random.vocab_size" if not config.model.name_or_path else "config.tokenizer.name_or_path"
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                          f"{model_config.vocab_size}: check {field}")
    return model_config, params


def setup_run(config, *, load_weights: bool = True) -> RunSetup:
    """Validates the config, starts the distributed runtime if asked, then on every process:
    tokenizer, records, train / held-out split and encoded training prompts (local work), then
    mesh and model. Each of the two stages fails on all processes if it fails on one
    (`distributed.all_or_none`), so a file missing on one host stops every host with its error."""
    validate_config(config)
    distributed.initialize_from_config(config.distributed)

    def data_stage():
        tokenizer = build_tokenizer(config)
        records, drops = load_records(config)
        train, val = train_val_split(records, seed=int(config.data.split_seed),
                                     val_fraction=float(config.data.val_fraction))
        if config.data.max_train_examples:
            train = train[: int(config.data.max_train_examples)]
        prompt_ids, kept, prompt_drops = encode_prompts(tokenizer, train,
                                                        max_prompt_length=int(config.data.max_prompt_length))
        drops = drops.merged(DropCounts({f"train/{k}": v for k, v in prompt_drops.items()}))
        if len(kept) < config.rl.train_batch_size:
            raise ConfigError(f"config.rl.train_batch_size={config.rl.train_batch_size} exceeds the {len(kept)} "
                              f"training prompts left after filtering ({dict(drops)})")
        return tokenizer, kept, prompt_ids, val, drops

    tokenizer, kept, prompt_ids, val, drops = distributed.all_or_none("data setup", data_stage)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    model_config, params = distributed.all_or_none(
        "model setup", lambda: build_model(config, tokenizer, mesh, load_weights=load_weights))
    return RunSetup(config, mesh, tokenizer, model_config, params, kept, prompt_ids, val, drops)


def held_out_accuracy(config, setup: RunSetup, params, *, num_examples: int | None = None) -> dict:
    """Greedy exact-call accuracy on the first `eval.num_examples` held-out records."""
    n = int(config.eval.num_examples if num_examples is None else num_examples)
    records = setup.val_records[:n]
    if not records:
        return {"accuracy": float("nan"), "format_failure_rate": float("nan"), "num_scored": 0}
    return rollouts.greedy_accuracy(
        setup.model_config, params, setup.tokenizer, records, max_new_tokens=int(config.eval.max_new_tokens),
        max_prompt_length=int(config.data.max_prompt_length), batch_size=int(config.eval.batch_size), mesh=setup.mesh,
    )


# ----------------------------------------------------------------------------- data order and RNG


def step_prompt_indices(seed: int, step: int, num_train: int, batch_size: int) -> tuple[int, int, np.ndarray]:
    """(epoch, index into that epoch's shuffled order, [batch_size] prompt indices) of `step`.
    Each epoch covers num_train // batch_size whole batches of a permutation seeded by (seed, epoch)."""
    per_epoch = num_train // batch_size
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_train)
    start = index * batch_size
    return epoch, start, order[start:start + batch_size]


def step_rng(seed: int, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), step)


# ----------------------------------------------------------------------------- the loop


def _abstract_state(model_config, optimizer, mesh, param_dtype) -> TrainState:
    """Shapes, dtypes and shardings of a TrainState (a restore target), with no arrays made."""
    shardings = state_sharding(model_config, optimizer, mesh, TRAIN_RULES)
    params = abstract_params(model_config, mesh, param_dtype, TRAIN_RULES)
    opt_state = jax.eval_shape(optimizer.init, params)
    opt_state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), opt_state, shardings.opt_state)
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step), params=params, opt_state=opt_state)


@functools.lru_cache(maxsize=8)
def _optimizer_and_step(model_config: ModelConfig, mesh, optim: tuple, **step_kwargs):
    """(optimizer, jitted GRPO step), cached on hashable settings: runs in one process (tests,
    notebooks, resume) reuse the compiled step instead of compiling it again."""
    optimizer = make_optimizer(*optim)
    return optimizer, make_grpo_step(model_config, optimizer, mesh=mesh, **step_kwargs)


def _update_batches(rollout: rollouts.RolloutBatch, advantages: np.ndarray, loss_mask: np.ndarray,
                    mini_batch_size: int, ppo_epochs: int, rng: np.random.Generator):
    """Yields (ppo_epoch, mini-batch dict) for every update of one rollout batch. Groups stay
    together; the first pass keeps the rollout order, later passes reshuffle the groups."""
    n = rollout.num_samples
    groups = rollout.num_rows // n
    for epoch in range(ppo_epochs):
        order = np.arange(groups) if epoch == 0 else rng.permutation(groups)
        for start in range(0, groups, mini_batch_size):
            rows = (order[start:start + mini_batch_size, None] * n + np.arange(n)).reshape(-1)
            yield epoch, {
                "input_ids": rollout.input_ids[rows],
                "attention_mask": rollout.attention_mask[rows],
                "loss_mask": loss_mask[rows],
                "advantages": advantages[rows],
                "old_logprobs": rollout.old_logprobs[rows],
            }


_MEAN_KEYS = ("loss", "policy_loss", "kl", "entropy", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "grad_norm")


def _combine_update_metrics(updates: list[dict]) -> dict:
    out = {k: float(np.mean([u[k] for u in updates])) for k in _MEAN_KEYS}
    out["ratio_min"] = float(min(u["ratio_min"] for u in updates))
    out["ratio_max"] = float(max(u["ratio_max"] for u in updates))
    first = updates[0]
    out["first_ratio_max_dev"] = float(max(abs(first["ratio_max"] - 1.0), abs(first["ratio_min"] - 1.0)))
    return out


def _summary_value(row: dict | None, key: str):
    return None if row is None else row.get(key)


def _agreed_step(step: int) -> int:
    """The restored step, checked to be the same on every process (each reads the shared folder)."""
    steps = distributed.gather_ints(step)
    if len(set(steps)) > 1:
        raise ckpt_lib.CheckpointReadError(f"processes restored different checkpoints {steps}: some hosts cannot "
                                           "read the newest one; check the output_dir they share")
    return step


def _checkpoint_meta(config, model_config, setup: RunSetup, step: int, num_updates: int, summary: dict) -> dict:
    """What a checkpoint records beside the arrays (JSON-safe)."""
    meta = {"step": step, "num_updates": num_updates, "seed": int(config.seed),
            "data_position": dict(zip(("epoch", "index"), step_prompt_indices(
                int(config.seed), step, len(setup.train_records), config.rl.train_batch_size)[:2])),
            "model_config": dataclasses.asdict(model_config), "config": config.to_dict(), "sft": summary.get("sft")}
    return json.loads(json.dumps(meta, default=str))


# Config fields that change what a resumed run computes: a difference is warned about, or refused.
RUN_DEFINING = ("seed", "model.", "tokenizer.", "data.", "rl.train_batch_size", "rl.mini_batch_size",
                "rl.micro_batch_size", "rl.ppo_epochs", "rollout.num_samples", "rollout.max_new_tokens", "optim.", "sft.")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_resumed_config(config, saved: dict, is_main: bool) -> None:
    """Warns (or, with `resume.strict`, raises ConfigError) when a run-defining field differs
    from the checkpoint's config."""
    now, then = _flatten(config.to_dict()), _flatten(saved)
    diffs = [f"config.{k}: {then.get(k)!r} in the checkpoint, {now.get(k)!r} now"
             for k in sorted(set(now) | set(then))
             if any(k == f or (f.endswith(".") and k.startswith(f)) for f in RUN_DEFINING)
             and json.dumps(now.get(k), default=str) != json.dumps(then.get(k), default=str)]
    if not diffs:
        return
    message = "resuming with a config that differs from the checkpoint's: " + "; ".join(diffs)
    if config.resume.strict:
        raise ConfigError(message + " (config.resume.strict=True)")
    if is_main:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def log_directory(config) -> str:
    """The local folder for metrics.jsonl, eval.jsonl, summary.json and the reward curve:
    `log.dir`, else `output_dir`; with a gs:// output_dir and no `log.dir`, runs/<run name>."""
    if config.log.dir:
        return config.log.dir
    if "://" in config.output_dir:
        return os.path.join("runs", config.output_dir.rstrip("/").rsplit("/", 1)[-1])
    return config.output_dir


def train(config) -> dict:
    """Runs (or resumes from the latest checkpoint in `output_dir`) GRPO for `config`.

    Returns the run summary (written to `summary.json` too, except `params`): steps and updates
    done, the last step's metrics (`final`), held-out results before RL (`eval_start`, after the
    SFT warm start if any) and after it (`eval_end`), their accuracies, the reward-curve path,
    drop counts, and `params`, the final policy parameters."""
    with interrupt.StopRequest() as stop:
        return _run(config, stop)


def _run(config, stop: interrupt.StopRequest) -> dict:
    t_run = time.perf_counter()
    config = validate_config(config)
    distributed.initialize_from_config(config.distributed)  # before any other JAX call (orbax's too)
    out_dir = config.output_dir  # checkpoints (may be a gs:// URL, shared by all hosts)
    log_dir = log_directory(config)  # metrics, summary, plots: always a local folder
    is_main = distributed.is_main()

    def output_stage():  # seconds, not a warm start, before an unwritable folder is found
        distributed.check_writable(out_dir, "config.output_dir")
        if is_main:
            distributed.check_writable(log_dir, "config.log.dir" if config.log.dir else "config.output_dir")

    distributed.all_or_none("output setup", output_stage)
    # Always there: with checkpoint.every_steps=0 it still saves once when the run is interrupted.
    checkpointer = ckpt_lib.RunCheckpointer(out_dir, keep=int(config.checkpoint.keep))
    resume_step = checkpointer.latest_step()
    setup = setup_run(config, load_weights=resume_step is None)
    mesh, model_config, tokenizer = setup.mesh, setup.model_config, setup.tokenizer
    total = total_rl_steps(config, len(setup.train_records))
    rl, ro = config.rl, config.rollout
    o = config.optim
    # Sequences per gradient-accumulation chunk (also the unit the batch sharding must divide).
    micro = int(rl.micro_batch_size) or int(rl.mini_batch_size * ro.num_samples)
    optimizer, grpo_step = _optimizer_and_step(
        model_config, mesh, (float(o.lr), int(o.warmup_steps), float(o.weight_decay), float(o.b1), float(o.b2),
                             float(o.grad_clip) or None),
        micro_batch_size=micro, temperature=float(ro.temperature),
        completion_len=int(ro.max_new_tokens), clip_eps=float(rl.clip_eps), kl_coef=float(rl.kl_coef),
        kl_estimator=str(rl.kl_estimator), entropy_coef=float(rl.entropy_coef), aggregation=str(rl.aggregation),
    )
    param_dtype = jnp.dtype(config.model.param_dtype)
    summary: dict[str, Any] = {"output_dir": out_dir, "log_dir": log_dir, "total_steps": total, "drops": dict(setup.drops),
                               "num_train": len(setup.train_records), "num_val": len(setup.val_records)}

    params, sft_done, meta = setup.params, 0, None
    if resume_step is not None:
        abstract = _abstract_state(model_config, optimizer, mesh, param_dtype)
        # Newest first: a damaged checkpoint is skipped with a warning, not a crash on every restart.
        resume_step, params, opt_state, meta = checkpointer.restore_latest_readable(abstract.params, abstract.opt_state)
        resume_step = _agreed_step(resume_step)
        _check_resumed_config(config, meta.get("config") or {}, is_main)
        if (meta.get("sft") or {}).get("interrupted"):  # stopped inside the warm start: finish it first
            sft_done, resume_step = int(meta["sft"]["sft_steps"]), None
            if is_main:
                print(f"resuming the SFT warm start at step {sft_done} of {config.sft.warm_start_steps} "
                      "(fresh AdamW moments)", flush=True)
    if resume_step is None:
        if config.sft.warm_start_steps > sft_done:
            from tooln1_jax.sft import run_sft

            params, sft_metrics = run_sft(
                config, model_config, params, tokenizer, setup.train_records, mesh=mesh, start_step=sft_done,
                steps=int(config.sft.warm_start_steps) - sft_done, should_stop=stop.requested,
                log_fn=lambda s, m: print(f"sft step {s}: loss {m['sft_loss']:.4f}", flush=True) if is_main else None)
            summary["sft"] = {k: v for k, v in sft_metrics.items() if not isinstance(v, list)}
            summary["sft"]["sft_steps"] += sft_done
        params = shard_params(params, model_config, mesh, TRAIN_RULES)  # SFT may leave other shardings
        state = init_train_state(params, optimizer, model_config=model_config, mesh=mesh)
        if (summary.get("sft") or {}).get("interrupted"):
            checkpointer.save(0, state.params, state.opt_state, _checkpoint_meta(config, model_config, setup, 0, 0, summary))
            checkpointer.close()
            raise interrupt.RunInterrupted(
                f"interrupted during the SFT warm start after {summary['sft']['sft_steps']} of "
                f"{config.sft.warm_start_steps} steps; saved {checkpointer.directory}/0; run the same command "
                "again to finish the warm start and train", stop.signal_number())
        ref = None
        if rl.kl_coef:
            ckpt_lib.save_reference(out_dir, state.params)
            ref = reference_params(state.params, jnp.bfloat16 if rl.ref_in_bf16 else None)
        start_step, num_updates = 0, 0
    else:
        num_updates = int(meta["num_updates"])
        state = TrainState(step=jax.device_put(jnp.int32(num_updates), abstract.step.sharding), params=params, opt_state=opt_state)
        ref = None
        if rl.kl_coef:
            ref = ckpt_lib.restore_reference(out_dir, abstract.params)
            ref = reference_params(ref, jnp.bfloat16 if rl.ref_in_bf16 else None)
        start_step = int(meta["step"])
        summary["sft"] = meta.get("sft")
        earlier = [r for r in read_jsonl(os.path.join(log_dir, EVAL_FILE)) if r.get("step") == 0]
        if earlier:  # the held-out result before RL, from the run's first start
            summary["eval_start"] = earlier[0]
        if is_main:
            print(f"resuming from {checkpointer.directory}/{start_step} (step {start_step} of {total})", flush=True)

    log = MetricsLogger(log_dir, total_steps=total, start_step=start_step, tensorboard=config.log.tensorboard,
                        progress_bar=config.log.progress_bar, is_main=is_main)
    eval_rows: list[dict] = []
    last_row = None

    def evaluate(step: int, params) -> dict:
        acc = held_out_accuracy(config, setup, params)
        row = log.log_eval(step, {k: v for k, v in acc.items() if not isinstance(v, list)})
        eval_rows.append(row)
        return row

    def save(step: int) -> None:
        checkpointer.save(step, state.params, state.opt_state,
                          _checkpoint_meta(config, model_config, setup, step, num_updates, summary))

    done, interrupted = start_step, False
    try:
        if start_step == 0 and config.eval.at_start and config.eval.num_examples:
            summary["eval_start"] = evaluate(0, state.params)
        for step in range(start_step, total):
            t0 = time.perf_counter()
            epoch, _, idx = step_prompt_indices(int(config.seed), step, len(setup.train_records), rl.train_batch_size)
            rng = step_rng(int(config.seed), step)
            batch = rollouts.generate_and_score(
                model_config, state.params, tokenizer, [setup.train_prompt_ids[i] for i in idx],
                [setup.train_records[i] for i in idx], num_samples=ro.num_samples, max_new_tokens=ro.max_new_tokens,
                temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k, rng=rng, mesh=mesh,
                reward_variant=rl.reward_variant, prompts_per_call=int(ro.prompts_per_call),
                decode_segments=int(ro.decode_segments),
            )
            t_rollout = time.perf_counter() - t0
            rewards = jnp.asarray(batch.rewards)
            advantages = np.asarray(group_advantages(rewards, ro.num_samples, unbiased=bool(rl.unbiased_std)), np.float32)
            informative = np.asarray(nonzero_std_groups(rewards, ro.num_samples))
            loss_mask = batch.loss_mask * informative[:, None] if rl.filter_zero_std_groups else batch.loss_mask

            t1 = time.perf_counter()
            shuffle_rng = np.random.default_rng([int(config.seed), step, 1])
            update_metrics = []
            for ppo_epoch, mb in _update_batches(batch, advantages, loss_mask, rl.mini_batch_size, rl.ppo_epochs, shuffle_rng):
                state, m = grpo_step(state, ref, shard_batch(mb, mesh, TRAIN_RULES, micro))
                m = jax.device_get(m)
                if not bool(m["finite"]):
                    raise NonFiniteLossError(
                        f"step {step + 1}: the GRPO update {len(update_metrics) + 1} (ppo epoch {ppo_epoch}) has a "
                        f"non-finite loss={float(m['loss'])} / grad_norm={float(m['grad_norm'])}; the run stops here "
                        f"with nothing saved from this step (last checkpoint: "
                        f"{checkpointer.latest_step()}). Lower config.optim.lr or "
                        f"check the data and the reward.")
                update_metrics.append(m)
                num_updates += 1
            t_update = time.perf_counter() - t1
            step_time = time.perf_counter() - t0
            generated = float(np.sum(batch.lengths))
            row = {
                **batch.summary(),
                "reward_std": float(np.std(batch.rewards)),
                "zero_std_group_frac": float(1.0 - np.mean(informative)),
                **_combine_update_metrics(update_metrics),
                "lr": float(config.optim.lr if num_updates > config.optim.warmup_steps
                            else config.optim.lr * num_updates / max(config.optim.warmup_steps, 1)),
                "epoch": epoch, "num_updates": num_updates,
                "tokens_per_s": generated / step_time, "rollout_tokens_per_s": generated / t_rollout,
                "step_time": step_time, "rollout_time": t_rollout, "update_time": t_update,
            }
            last_row = log.log_step(step + 1, row)
            done = step + 1
            final_eval_follows = done == total and config.eval.at_end
            if config.eval.every_steps and done % config.eval.every_steps == 0 and not final_eval_follows:
                evaluate(done, state.params)
            every = int(config.checkpoint.every_steps)
            saved = every and (done % every == 0 or done == total)
            if saved:
                save(done)
            if done < total and stop.requested():  # a step boundary: save once, then stop
                if not saved:
                    save(done)
                interrupted = True
                break
        if config.eval.at_end and config.eval.num_examples and not interrupted:
            summary["eval_end"] = evaluate(total, state.params)
    finally:
        checkpointer.close()
        curve = log.close(plot=config.log.plot)

    summary.update({
        "steps_done": done, "interrupted": interrupted, "num_updates": num_updates, "final": last_row, "curve_png": curve,
        "metrics_path": log.path, "wall_s": time.perf_counter() - t_run,
        "accuracy_start": _summary_value(summary.get("eval_start"), "accuracy"),
        "accuracy_end": _summary_value(summary.get("eval_end"), "accuracy"),
    })
    summary["params"] = state.params  # not written to JSON
    if is_main:
        with open(os.path.join(log_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in summary.items() if k != "params"}, f, indent=1, default=str)
        start, end = summary["accuracy_start"], summary["accuracy_end"]
        if start is not None and end is not None:
            before = "after SFT" if summary.get("sft") else "before GRPO"
            print(f"held-out exact-call accuracy: {before} {start:.3f} -> after GRPO {end:.3f} "
                  f"({summary['eval_end'].get('num_scored')} prompts); reward curve: {curve}", flush=True)
    if interrupted:
        raise interrupt.RunInterrupted(
            f"interrupted at step {done} of {total}; saved {checkpointer.directory}/{done} and "
            f"{os.path.join(log_dir, 'summary.json')}; run the same command again to resume", stop.signal_number())
    return summary


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m tooln1_jax.train [--config configs/x.py] [--config.a.b=value ...] [--verbose]`."""
    cli.run(train, argv, __doc__)


class _CallableModule(types.ModuleType):
    """Importing this submodule replaces the package's `tooln1_jax.train` function with the
    module itself; making the module callable keeps `tooln1_jax.train(config)` working."""

    def __call__(self, config) -> dict:
        return train(config)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
