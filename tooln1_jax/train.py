"""The GRPO training loop and its CLI.

    python -m tooln1_jax.train                                   # the demo (configs/tiny_cpu.py)
    python -m tooln1_jax.train --config configs/smollm2_135m_cpu.py --config.rl.kl_coef=0.0

One step (a rollout batch, `iteration.grpo_iteration`): take `rl.train_batch_size` prompts in a seeded
per-epoch order, sample `rollout.num_samples` completions each, score them with the rule-based
reward, turn the rewards into group advantages, then split the rows into mini-batches of
`rl.mini_batch_size` prompts, one optimizer update each, for `rl.ppo_epochs` passes. Held-out
greedy accuracy every `eval.every_steps`; a checkpoint every `checkpoint.every_steps` (and at
the end).

A run resumed from its latest checkpoint repeats the uninterrupted run exactly (everything
random is a function of seed and step). A non-finite loss stops the run
(`iteration.NonFiniteLossError`) before anything non-finite is saved.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from tooln1_jax import checkpoint as ckpt_lib
from tooln1_jax import cli, distributed, interrupt
from tooln1_jax.config import lora_settings, rollout_prompts, total_rl_steps, validate_config
from tooln1_jax.iteration import GrpoProgram, Progress, grpo_iteration, grpo_program, step_prompt_indices
from tooln1_jax.metrics import EVAL_FILE, MetricsLogger, read_jsonl
from tooln1_jax.models import shard_params
from tooln1_jax.resume import abstract_train_state, agreed_step, check_resumed_config, checkpoint_meta
from tooln1_jax.run_setup import (
    RunSetup,
    held_out_results,
    initial_adapters,
    log_directory,
    policy_params,
    setup_run,
    sft_stop_probe,
)
from tooln1_jax.sft import run_sft, summary_metrics
from tooln1_jax.sharding import TRAIN_RULES
from tooln1_jax.train_step import TrainState, init_train_state, reference_params

# ----------------------------------------------------------------------------- start or resume


def _reference(config, setup: RunSetup, params):
    """The frozen reference for the KL term (None when kl_coef is 0). With LoRA, the frozen base
    itself, which the step needs anyway (the policy is the base plus the adapters): no copy."""
    if lora_settings(config).enabled:
        return setup.params
    return reference_params(params, jnp.bfloat16 if config.rl.ref_in_bf16 else None) if config.rl.kl_coef else None


def _policy(config, setup: RunSetup, progress: Progress):
    """The policy as plain params (with LoRA, merged): what rollouts, evaluations and the summary read."""
    return policy_params(config, setup.model_config, progress.state.params, progress.ref, setup.mesh)


def _resume(
    config, setup: RunSetup, checkpointer, program: GrpoProgram, summary: dict, is_main: bool
) -> tuple[Progress | None, Any, int]:
    """(progress, trainable params, SFT steps done) from the newest readable checkpoint (with LoRA
    the checkpoint holds the adapters; the base is `setup.params`). A run stopped inside the SFT
    warm start gives no progress: its params and step count finish the warm start first."""
    abstract = abstract_train_state(
        setup.model_config, program.optimizer, setup.mesh, jnp.dtype(config.model.param_dtype), program.lora
    )
    # Newest first: a damaged checkpoint is skipped with a warning, not a crash on every restart.
    step, params, opt_state, meta = checkpointer.restore_latest_readable(abstract.params, abstract.opt_state)
    step = agreed_step(step)
    check_resumed_config(config, meta.get("config") or {}, is_main)
    if (meta.get("sft") or {}).get("interrupted"):
        sft_done = int(meta["sft"]["sft_steps"])
        if is_main:
            print(
                f"resuming the SFT warm start at step {sft_done} of {config.sft.warm_start_steps} "
                "(fresh AdamW moments)",
                flush=True,
            )
        return None, params, sft_done
    num_updates = int(meta["num_updates"])
    state = TrainState(
        step=jax.device_put(jnp.int32(num_updates), abstract.step.sharding), params=params, opt_state=opt_state
    )
    if program.lora.enabled or not config.rl.kl_coef:
        ref = _reference(config, setup, None)  # the base (LoRA) or none: nothing saved to restore
    else:
        ref = _reference(config, setup, ckpt_lib.restore_reference(config.output_dir, abstract.params))
    summary["sft"] = meta.get("sft")
    earlier = [r for r in read_jsonl(os.path.join(summary["log_dir"], EVAL_FILE)) if r.get("step") == 0]
    if earlier:  # the held-out result before RL, from the run's first start
        summary["eval_start"] = earlier[0]
    if is_main:
        print(f"resuming from {checkpointer.directory}/{step} (step {step} of {summary['total_steps']})", flush=True)
    return Progress(state, ref, step, num_updates), params, 0


def _print_sft(step: int, metrics: dict) -> None:
    if "sft_loss" in metrics:
        print(f"sft step {step}: loss {metrics['sft_loss']:.4f}", flush=True)
    if "sft_probe_accuracy" in metrics:
        print(f"sft step {step}: probe held-out accuracy {metrics['sft_probe_accuracy']:.3f}", flush=True)


def _start(
    config,
    setup: RunSetup,
    checkpointer,
    program: GrpoProgram,
    params,
    sft_done: int,
    summary: dict,
    stop: interrupt.StopRequest,
) -> Progress:
    """A fresh GRPO start: the SFT warm start (or its rest) of `params` (the trainable ones: the
    adapters with LoRA), then the train state and the reference. A warm start interrupted by a
    signal saves its params as checkpoint 0 and stops the run."""
    is_main = distributed.is_main()
    if config.sft.warm_start_steps > sft_done:
        params, sft_metrics = run_sft(
            config,
            setup.model_config,
            setup.params if program.lora.enabled else params,
            setup.tokenizer,
            setup.train_records,
            mesh=setup.mesh,
            start_step=sft_done,
            steps=int(config.sft.warm_start_steps) - sft_done,
            should_stop=stop.requested,
            log_fn=_print_sft if is_main else None,
            adapters=params if program.lora.enabled else None,
            probe=sft_stop_probe(config, setup),
        )
        summary["sft"] = summary_metrics(sft_metrics)
        summary["sft"]["sft_steps"] += sft_done
    if not program.lora.enabled:
        params = shard_params(params, setup.model_config, setup.mesh, TRAIN_RULES)  # SFT may leave other shardings
    state = init_train_state(
        params, program.optimizer, model_config=setup.model_config, mesh=setup.mesh, lora=program.lora
    )
    progress = Progress(state, None, 0, 0)
    if (summary.get("sft") or {}).get("interrupted"):
        _save(config, setup, checkpointer, progress, summary)
        checkpointer.close()
        raise interrupt.RunInterrupted(
            f"interrupted during the SFT warm start after {summary['sft']['sft_steps']} of "
            f"{config.sft.warm_start_steps} steps; saved {checkpointer.directory}/0; run the same command "
            "again to finish the warm start and train",
            stop.signal_number(),
        )
    if config.rl.kl_coef and not program.lora.enabled:  # a LoRA run's reference is its base
        ckpt_lib.save_reference(config.output_dir, progress.state.params)
    progress.ref = _reference(config, setup, progress.state.params)
    return progress


def _save(config, setup: RunSetup, checkpointer, progress: Progress, summary: dict) -> None:
    data_epoch, index, _ = step_prompt_indices(
        int(config.seed), progress.step, len(setup.train_records), rollout_prompts(config)
    )
    meta = checkpoint_meta(
        config,
        setup.model_config,
        step=progress.step,
        num_updates=progress.num_updates,
        data_position={"epoch": data_epoch, "index": index},
        sft_summary=summary.get("sft"),
    )
    checkpointer.save(progress.step, progress.state.params, progress.state.opt_state, meta)


# ----------------------------------------------------------------------------- the run


def _evaluate(config, setup: RunSetup, log: MetricsLogger, progress: Progress) -> dict:
    return log.log_eval(progress.step, held_out_results(config, setup, _policy(config, setup, progress)))


def _train_steps(
    config,
    setup: RunSetup,
    program: GrpoProgram,
    progress: Progress,
    log: MetricsLogger,
    checkpointer,
    summary: dict,
    stop: interrupt.StopRequest,
) -> bool:
    """GRPO steps up to `total_steps`, with evaluations and checkpoints; True when a signal
    stopped it at a step boundary (after a checkpoint of that step)."""
    total = summary["total_steps"]
    if progress.step == 0 and config.eval.at_start and config.eval.num_examples:
        summary["eval_start"] = _evaluate(config, setup, log, progress)
    while progress.step < total:
        summary["final"] = log.log_step(
            progress.step + 1, grpo_iteration(config, setup, program, progress, checkpointer.latest_step)
        )
        done = progress.step
        final_eval_follows = done == total and config.eval.at_end
        if config.eval.every_steps and done % config.eval.every_steps == 0 and not final_eval_follows:
            _evaluate(config, setup, log, progress)
        every = int(config.checkpoint.every_steps)
        saved = every and (done % every == 0 or done == total)
        if saved:
            _save(config, setup, checkpointer, progress, summary)
        if done < total and stop.requested():  # a step boundary: save once, then stop
            if not saved:
                _save(config, setup, checkpointer, progress, summary)
            return True
    if config.eval.at_end and config.eval.num_examples:
        summary["eval_end"] = _evaluate(config, setup, log, progress)
    return False


def _write_summary(summary: dict, log_dir: str) -> None:
    """summary.json (all but the params and adapters), and the before / after accuracy line."""
    with open(os.path.join(log_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in summary.items() if k not in ("params", "adapters")}, f, indent=1, default=str)
    start, end = summary["accuracy_start"], summary["accuracy_end"]
    if start is not None and end is not None:
        before = "after SFT" if summary.get("sft") else "before GRPO"
        print(
            f"held-out exact-call accuracy: {before} {start:.3f} -> after GRPO {end:.3f} "
            f"({summary['eval_end'].get('num_scored')} prompts); reward curve: {summary['curve_png']}",
            flush=True,
        )


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
    drop counts, `params`, the final policy parameters (with LoRA, the base with the adapters
    merged), and `adapters` (None without LoRA)."""
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
    lora = lora_settings(config)
    setup = setup_run(config, load_weights=resume_step is None or lora.enabled)  # a LoRA checkpoint holds no base
    program = grpo_program(config, setup)
    summary: dict[str, Any] = {
        "output_dir": config.output_dir,
        "log_dir": log_dir,
        "total_steps": total_rl_steps(config, len(setup.train_records)),
        "drops": dict(setup.drops),
        "num_train": len(setup.train_records),
        "num_val": len(setup.val_records),
        "final": None,
    }
    progress, sft_done = None, 0
    params = initial_adapters(config, setup.model_config, setup.params, setup.mesh) if lora.enabled else setup.params
    if resume_step is not None:
        progress, params, sft_done = _resume(config, setup, checkpointer, program, summary, distributed.is_main())
    if progress is None:
        progress = _start(config, setup, checkpointer, program, params, sft_done, summary, stop)
    log = MetricsLogger(
        log_dir,
        total_steps=summary["total_steps"],
        start_step=progress.step,
        tensorboard=config.log.tensorboard,
        progress_bar=config.log.progress_bar,
        is_main=distributed.is_main(),
    )
    try:
        interrupted = _train_steps(config, setup, program, progress, log, checkpointer, summary, stop)
    finally:
        checkpointer.close()
        curve = log.close(plot=config.log.plot)
    summary.update(
        {
            "steps_done": progress.step,
            "interrupted": interrupted,
            "num_updates": progress.num_updates,
            "curve_png": curve,
            "metrics_path": log.path,
            "wall_s": time.perf_counter() - t_run,
            "accuracy_start": (summary.get("eval_start") or {}).get("accuracy"),
            "accuracy_end": (summary.get("eval_end") or {}).get("accuracy"),
            "params": _policy(config, setup, progress),  # not written to JSON (with LoRA: merged)
            "adapters": progress.state.params if lora.enabled else None,
        }
    )
    if distributed.is_main():
        _write_summary(summary, log_dir)
    if interrupted:
        raise interrupt.RunInterrupted(
            f"interrupted at step {progress.step} of {summary['total_steps']}; saved "
            f"{checkpointer.directory}/{progress.step} and {os.path.join(log_dir, 'summary.json')}; run the same "
            "command again to resume",
            stop.signal_number(),
        )
    return summary


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m tooln1_jax.train [--config configs/x.py] [--config.a.b=value ...] [--verbose]`."""
    cli.run(train, argv, __doc__)


if __name__ == "__main__":
    main()
