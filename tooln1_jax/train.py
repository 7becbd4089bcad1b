"""The GRPO training loop and its CLI.

    python -m tooln1_jax.train                                   # the demo (configs/tiny_cpu.py)
    python -m tooln1_jax.train --config configs/smollm2_135m_cpu.py --config.rl.kl_coef=0.0

One step (a rollout batch, `grpo_iteration`): take `rl.train_batch_size` prompts in a seeded
per-epoch order, sample `rollout.num_samples` completions each, score them with the rule-based
reward, turn the rewards into group advantages, then split the rows into mini-batches of
`rl.mini_batch_size` prompts, one optimizer update each, for `rl.ppo_epochs` passes. Held-out
greedy accuracy every `eval.every_steps`; a checkpoint every `checkpoint.every_steps` (and at
the end).

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
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tooln1_jax import checkpoint as ckpt_lib
from tooln1_jax import cli, distributed, interrupt, rollouts
from tooln1_jax.config import loss_settings, optimizer_settings, total_rl_steps, validate_config
from tooln1_jax.grpo import LossSettings, group_advantages, nonzero_std_groups
from tooln1_jax.metrics import EVAL_FILE, MetricsLogger, read_jsonl
from tooln1_jax.models import ModelConfig, shard_params
from tooln1_jax.optimizer import OptimizerSettings, make_optimizer
from tooln1_jax.resume import abstract_train_state, agreed_step, check_resumed_config, checkpoint_meta
from tooln1_jax.run_setup import RunSetup, held_out_accuracy, log_directory, setup_run
from tooln1_jax.sft import run_sft
from tooln1_jax.sharding import TRAIN_RULES
from tooln1_jax.train_step import TrainState, init_train_state, make_grpo_step, reference_params, shard_batch


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
    return data_epoch, start, order[start:start + batch_size]


def step_rng(seed: int, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), step)


# ----------------------------------------------------------------------------- the update program


@dataclasses.dataclass(frozen=True)
class GrpoProgram:
    """The optimizer and the jitted GRPO step of a run. `micro_batch_size` counts sequences per
    gradient-accumulation chunk (also the unit the batch sharding must divide)."""

    optimizer: optax.GradientTransformation
    update: Callable
    micro_batch_size: int
    optimizer_settings: OptimizerSettings


@functools.lru_cache(maxsize=8)
def _grpo_program(model_config: ModelConfig, mesh, optim: OptimizerSettings, loss: LossSettings,
                  micro_batch_size: int, temperature: float, completion_len: int) -> GrpoProgram:
    """Cached on hashable settings: runs in one process (tests, notebooks, resume) reuse the
    compiled step instead of compiling it again."""
    optimizer = make_optimizer(optim)
    update = make_grpo_step(model_config, optimizer, mesh=mesh, micro_batch_size=micro_batch_size,
                            temperature=temperature, completion_len=completion_len, loss_settings=loss)
    return GrpoProgram(optimizer, update, micro_batch_size, optim)


def grpo_program(config, setup: RunSetup) -> GrpoProgram:
    """The run's optimizer and GRPO step, from `config.optim`, `config.rl` and `config.rollout`."""
    rl, ro = config.rl, config.rollout
    micro = int(rl.micro_batch_size) or int(rl.mini_batch_size * ro.num_samples)
    return _grpo_program(setup.model_config, setup.mesh, optimizer_settings(config), loss_settings(config), micro,
                         float(ro.temperature), int(ro.max_new_tokens))


@dataclasses.dataclass
class Progress:
    """What the loop carries from step to step: the train state, the frozen reference (None
    when kl_coef is 0), rollout batches done and optimizer updates applied."""

    state: TrainState
    ref: Any
    step: int
    num_updates: int


# ----------------------------------------------------------------------------- one iteration


def _update_batches(rollout: rollouts.RolloutBatch, advantages: np.ndarray, loss_mask: np.ndarray,
                    mini_batch_size: int, ppo_epochs: int, rng: np.random.Generator):
    """Yields (ppo pass, mini-batch dict) for every update of one rollout batch. Groups stay
    together; the first pass keeps the rollout order, later passes reshuffle the groups."""
    n = rollout.num_samples
    groups = rollout.num_rows // n
    for ppo_pass in range(ppo_epochs):
        order = np.arange(groups) if ppo_pass == 0 else rng.permutation(groups)
        for start in range(0, groups, mini_batch_size):
            rows = (order[start:start + mini_batch_size, None] * n + np.arange(n)).reshape(-1)
            yield ppo_pass, {
                "input_ids": rollout.input_ids[rows],
                "attention_mask": rollout.attention_mask[rows],
                "loss_mask": loss_mask[rows],
                "advantages": advantages[rows],
                "old_logprobs": rollout.old_logprobs[rows],
            }


_MEAN_KEYS = ("loss", "policy_loss", "kl", "entropy", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean",
              "grad_norm")


def _combine_update_metrics(updates: list[dict]) -> dict:
    out = {k: float(np.mean([u[k] for u in updates])) for k in _MEAN_KEYS}
    out["ratio_min"] = float(min(u["ratio_min"] for u in updates))
    out["ratio_max"] = float(max(u["ratio_max"] for u in updates))
    first = updates[0]
    out["first_ratio_max_dev"] = float(max(abs(first["ratio_max"] - 1.0), abs(first["ratio_min"] - 1.0)))
    return out


def _apply_updates(config, setup: RunSetup, program: GrpoProgram, progress: Progress, batch, advantages, loss_mask,
                   last_checkpoint: Callable[[], int | None]) -> list[dict]:
    """Every optimizer update of one rollout batch, applied to `progress`; their metrics."""
    rl = config.rl
    shuffle_rng = np.random.default_rng([int(config.seed), progress.step, 1])
    metrics = []
    for ppo_pass, mb in _update_batches(batch, advantages, loss_mask, rl.mini_batch_size, rl.ppo_epochs, shuffle_rng):
        state, m = program.update(progress.state, progress.ref,
                                  shard_batch(mb, setup.mesh, TRAIN_RULES, program.micro_batch_size))
        m = jax.device_get(m)
        if not bool(m["finite"]):
            raise NonFiniteLossError(
                f"step {progress.step + 1}: the GRPO update {len(metrics) + 1} (ppo epoch {ppo_pass}) has a "
                f"non-finite loss={float(m['loss'])} / grad_norm={float(m['grad_norm'])}; the run stops here "
                f"with nothing saved from this step (last checkpoint: {last_checkpoint()}). Lower "
                "config.optim.lr or check the data and the reward.")
        progress.state = state
        progress.num_updates += 1
        metrics.append(m)
    return metrics


def grpo_iteration(config, setup: RunSetup, program: GrpoProgram, progress: Progress,
                   last_checkpoint: Callable[[], int | None] = lambda: None) -> dict:
    """One rollout batch and its updates: advances `progress` by one step and returns the step's
    metrics row (rollout summary, reward spread, update metrics, learning rate, timings)."""
    rl, ro = config.rl, config.rollout
    t0 = time.perf_counter()
    data_epoch, _, idx = step_prompt_indices(int(config.seed), progress.step, len(setup.train_records),
                                             rl.train_batch_size)
    batch = rollouts.generate_and_score(
        setup.model_config, progress.state.params, setup.tokenizer, [setup.train_prompt_ids[i] for i in idx],
        [setup.train_records[i] for i in idx], num_samples=ro.num_samples, max_new_tokens=ro.max_new_tokens,
        temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k, rng=step_rng(int(config.seed), progress.step),
        mesh=setup.mesh, reward_variant=rl.reward_variant, prompts_per_call=int(ro.prompts_per_call),
        decode_segments=int(ro.decode_segments),
    )
    t_rollout = time.perf_counter() - t0
    rewards = jnp.asarray(batch.rewards)
    advantages = np.asarray(group_advantages(rewards, ro.num_samples, unbiased=bool(rl.unbiased_std)), np.float32)
    informative = np.asarray(nonzero_std_groups(rewards, ro.num_samples))
    loss_mask = batch.loss_mask * informative[:, None] if rl.filter_zero_std_groups else batch.loss_mask

    t1 = time.perf_counter()
    updates = _apply_updates(config, setup, program, progress, batch, advantages, loss_mask, last_checkpoint)
    progress.step += 1
    t_update = time.perf_counter() - t1
    step_time = time.perf_counter() - t0
    generated = float(np.sum(batch.lengths))
    return {
        **batch.summary(),
        "reward_std": float(np.std(batch.rewards)),
        "zero_std_group_frac": float(1.0 - np.mean(informative)),
        **_combine_update_metrics(updates),
        "lr": program.optimizer_settings.applied_lr(progress.num_updates),
        "data_epoch": data_epoch, "num_updates": progress.num_updates,
        "tokens_per_s": generated / step_time, "rollout_tokens_per_s": generated / t_rollout,
        "step_time": step_time, "rollout_time": t_rollout, "update_time": t_update,
    }


# ----------------------------------------------------------------------------- start or resume


def _reference(config, params):
    """The frozen reference for the KL term (None when kl_coef is 0)."""
    return reference_params(params, jnp.bfloat16 if config.rl.ref_in_bf16 else None) if config.rl.kl_coef else None


def _resume(config, setup: RunSetup, checkpointer, program: GrpoProgram, summary: dict,
            is_main: bool) -> tuple[Progress | None, Any, int]:
    """(progress, params, SFT steps done) from the newest readable checkpoint. A run stopped inside
    the SFT warm start gives no progress: its params and step count finish the warm start first."""
    abstract = abstract_train_state(setup.model_config, program.optimizer, setup.mesh,
                                    jnp.dtype(config.model.param_dtype))
    # Newest first: a damaged checkpoint is skipped with a warning, not a crash on every restart.
    step, params, opt_state, meta = checkpointer.restore_latest_readable(abstract.params, abstract.opt_state)
    step = agreed_step(step)
    check_resumed_config(config, meta.get("config") or {}, is_main)
    if (meta.get("sft") or {}).get("interrupted"):
        sft_done = int(meta["sft"]["sft_steps"])
        if is_main:
            print(f"resuming the SFT warm start at step {sft_done} of {config.sft.warm_start_steps} "
                  "(fresh AdamW moments)", flush=True)
        return None, params, sft_done
    num_updates = int(meta["num_updates"])
    state = TrainState(step=jax.device_put(jnp.int32(num_updates), abstract.step.sharding), params=params,
                       opt_state=opt_state)
    ref = _reference(config, ckpt_lib.restore_reference(config.output_dir, abstract.params)) \
        if config.rl.kl_coef else None
    summary["sft"] = meta.get("sft")
    earlier = [r for r in read_jsonl(os.path.join(summary["log_dir"], EVAL_FILE)) if r.get("step") == 0]
    if earlier:  # the held-out result before RL, from the run's first start
        summary["eval_start"] = earlier[0]
    if is_main:
        print(f"resuming from {checkpointer.directory}/{step} (step {step} of {summary['total_steps']})", flush=True)
    return Progress(state, ref, step, num_updates), params, 0


def _start(config, setup: RunSetup, checkpointer, program: GrpoProgram, params, sft_done: int, summary: dict,
           stop: interrupt.StopRequest) -> Progress:
    """A fresh GRPO start: the SFT warm start (or its rest), then the train state and the reference.
    A warm start interrupted by a signal saves its params as checkpoint 0 and stops the run."""
    is_main = distributed.is_main()
    if config.sft.warm_start_steps > sft_done:
        params, sft_metrics = run_sft(
            config, setup.model_config, params, setup.tokenizer, setup.train_records, mesh=setup.mesh,
            start_step=sft_done, steps=int(config.sft.warm_start_steps) - sft_done, should_stop=stop.requested,
            log_fn=lambda s, m: print(f"sft step {s}: loss {m['sft_loss']:.4f}", flush=True) if is_main else None)
        summary["sft"] = {k: v for k, v in sft_metrics.items() if not isinstance(v, list)}
        summary["sft"]["sft_steps"] += sft_done
    params = shard_params(params, setup.model_config, setup.mesh, TRAIN_RULES)  # SFT may leave other shardings
    progress = Progress(init_train_state(params, program.optimizer, model_config=setup.model_config, mesh=setup.mesh),
                        None, 0, 0)
    if (summary.get("sft") or {}).get("interrupted"):
        _save(config, setup, checkpointer, progress, summary)
        checkpointer.close()
        raise interrupt.RunInterrupted(
            f"interrupted during the SFT warm start after {summary['sft']['sft_steps']} of "
            f"{config.sft.warm_start_steps} steps; saved {checkpointer.directory}/0; run the same command "
            "again to finish the warm start and train", stop.signal_number())
    if config.rl.kl_coef:
        ckpt_lib.save_reference(config.output_dir, progress.state.params)
    progress.ref = _reference(config, progress.state.params)
    return progress


def _save(config, setup: RunSetup, checkpointer, progress: Progress, summary: dict) -> None:
    data_epoch, index, _ = step_prompt_indices(int(config.seed), progress.step, len(setup.train_records),
                                               config.rl.train_batch_size)
    meta = checkpoint_meta(config, setup.model_config, step=progress.step, num_updates=progress.num_updates,
                           data_position={"epoch": data_epoch, "index": index}, sft_summary=summary.get("sft"))
    checkpointer.save(progress.step, progress.state.params, progress.state.opt_state, meta)


# ----------------------------------------------------------------------------- the run


def _evaluate(config, setup: RunSetup, log: MetricsLogger, step: int, params) -> dict:
    acc = held_out_accuracy(config, setup, params)
    return log.log_eval(step, {k: v for k, v in acc.items() if not isinstance(v, list)})


def _train_steps(config, setup: RunSetup, program: GrpoProgram, progress: Progress, log: MetricsLogger,
                 checkpointer, summary: dict, stop: interrupt.StopRequest) -> bool:
    """GRPO steps up to `total_steps`, with evaluations and checkpoints; True when a signal
    stopped it at a step boundary (after a checkpoint of that step)."""
    total = summary["total_steps"]
    if progress.step == 0 and config.eval.at_start and config.eval.num_examples:
        summary["eval_start"] = _evaluate(config, setup, log, 0, progress.state.params)
    while progress.step < total:
        summary["final"] = log.log_step(progress.step + 1,
                                        grpo_iteration(config, setup, program, progress, checkpointer.latest_step))
        done = progress.step
        final_eval_follows = done == total and config.eval.at_end
        if config.eval.every_steps and done % config.eval.every_steps == 0 and not final_eval_follows:
            _evaluate(config, setup, log, done, progress.state.params)
        every = int(config.checkpoint.every_steps)
        saved = every and (done % every == 0 or done == total)
        if saved:
            _save(config, setup, checkpointer, progress, summary)
        if done < total and stop.requested():  # a step boundary: save once, then stop
            if not saved:
                _save(config, setup, checkpointer, progress, summary)
            return True
    if config.eval.at_end and config.eval.num_examples:
        summary["eval_end"] = _evaluate(config, setup, log, total, progress.state.params)
    return False


def _write_summary(summary: dict, log_dir: str) -> None:
    """summary.json (all but the params), and the before / after accuracy line."""
    with open(os.path.join(log_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in summary.items() if k != "params"}, f, indent=1, default=str)
    start, end = summary["accuracy_start"], summary["accuracy_end"]
    if start is not None and end is not None:
        before = "after SFT" if summary.get("sft") else "before GRPO"
        print(f"held-out exact-call accuracy: {before} {start:.3f} -> after GRPO {end:.3f} "
              f"({summary['eval_end'].get('num_scored')} prompts); reward curve: {summary['curve_png']}", flush=True)


def _check_outputs(config, log_dir: str) -> None:
    """Seconds, not a warm start, before an unwritable folder is found; on every process."""
    def check():
        distributed.check_writable(config.output_dir, "config.output_dir")
        if distributed.is_main():
            distributed.check_writable(log_dir, "config.log.dir" if config.log.dir else "config.output_dir")

    distributed.all_or_none("output setup", check)


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
    log_dir = log_directory(config)  # metrics, summary, plots: always a local folder
    _check_outputs(config, log_dir)
    # Always there: with checkpoint.every_steps=0 it still saves once when the run is interrupted.
    checkpointer = ckpt_lib.RunCheckpointer(config.output_dir, keep=int(config.checkpoint.keep))
    resume_step = checkpointer.latest_step()
    setup = setup_run(config, load_weights=resume_step is None)
    program = grpo_program(config, setup)
    summary: dict[str, Any] = {"output_dir": config.output_dir, "log_dir": log_dir,
                               "total_steps": total_rl_steps(config, len(setup.train_records)),
                               "drops": dict(setup.drops), "num_train": len(setup.train_records),
                               "num_val": len(setup.val_records), "final": None}
    progress, params, sft_done = None, setup.params, 0
    if resume_step is not None:
        progress, params, sft_done = _resume(config, setup, checkpointer, program, summary, distributed.is_main())
    if progress is None:
        progress = _start(config, setup, checkpointer, program, params, sft_done, summary, stop)
    log = MetricsLogger(log_dir, total_steps=summary["total_steps"], start_step=progress.step,
                        tensorboard=config.log.tensorboard, progress_bar=config.log.progress_bar,
                        is_main=distributed.is_main())
    try:
        interrupted = _train_steps(config, setup, program, progress, log, checkpointer, summary, stop)
    finally:
        checkpointer.close()
        curve = log.close(plot=config.log.plot)
    summary.update({
        "steps_done": progress.step, "interrupted": interrupted, "num_updates": progress.num_updates,
        "curve_png": curve, "metrics_path": log.path, "wall_s": time.perf_counter() - t_run,
        "accuracy_start": (summary.get("eval_start") or {}).get("accuracy"),
        "accuracy_end": (summary.get("eval_end") or {}).get("accuracy"),
        "params": progress.state.params,  # not written to JSON
    })
    if distributed.is_main():
        _write_summary(summary, log_dir)
    if interrupted:
        raise interrupt.RunInterrupted(
            f"interrupted at step {progress.step} of {summary['total_steps']}; saved "
            f"{checkpointer.directory}/{progress.step} and {os.path.join(log_dir, 'summary.json')}; run the same "
            "command again to resume", stop.signal_number())
    return summary


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m tooln1_jax.train [--config configs/x.py] [--config.a.b=value ...] [--verbose]`."""
    cli.run(train, argv, __doc__)


if __name__ == "__main__":
    main()
