"""Supervised fine-tuning: cross-entropy on the assistant tokens only.

Used as the demo's warm start before GRPO and as the paper's SFT baseline. The target of a
record is `format_completion(answer, template_reasoning(answer))` followed by the end-of-turn
token, so the model learns to stop. Each example is laid out like a rollout row:

    [pad ... pad, prompt (left-padded to P)] [completion, <|im_end|>, pad ... (right-padded to C)]

so every completion starts at column P, and the loss reads the hidden states of columns
P-1 ... P+C-2 only (no lm_head work on prompt tokens). Log-probs are GRPO's `sequence_logprobs`
(chunked over the vocabulary), so no [batch, seq, vocab] array of the whole batch is ever made.
With LoRA (`config.lora`) SFT trains the adapters on the frozen base, the same adapters GRPO
then continues from.

    python -m tooln1_jax.sft --config configs/tiny_cpu.py [--config.sft.warm_start_steps=1000]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tooln1_jax import cli, distributed
from tooln1_jax.config import lora_settings, sft_optimizer_settings
from tooln1_jax.data.prompt import encode_prompts, format_completion
from tooln1_jax.data.records import DropCounts, ToolRecord
from tooln1_jax.data.synthetic import template_reasoning
from tooln1_jax.models import ModelConfig, shard_params
from tooln1_jax.models.lora import adapter_sharding, attach
from tooln1_jax.optimizer import make_optimizer
from tooln1_jax.run_setup import held_out_accuracy, initial_adapters, policy_params, setup_run
from tooln1_jax.settings import LORA_OFF, LoraSettings
from tooln1_jax.sharding import TRAIN_RULES, batch_sharding
from tooln1_jax.train_step import TrainState, sequence_logprobs


@dataclasses.dataclass(frozen=True)
class SFTData:
    """Encoded examples. input_ids / attention_mask [N, P + C] int32; loss_mask [N, C] float32
    (1 on completion tokens, the stop token included); records [N] (kept, in order)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    prompt_width: int
    records: list
    drops: DropCounts

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def completion_text(record: ToolRecord) -> str:
    return format_completion(record.answer, template_reasoning(record.answer))


def encode_sft(
    tokenizer: Any,
    records: Sequence[ToolRecord],
    *,
    max_prompt_length: int,
    max_completion_length: int,
    prompt_width: int | None = None,
) -> SFTData:
    """Records -> `SFTData`. Prompts over `max_prompt_length` tokens (`prompt_too_long`) and
    targets over `max_completion_length` tokens (`completion_too_long`) are dropped and counted.
    `prompt_width` P defaults to the longest kept prompt; C is `max_completion_length`."""
    prompts, kept, drops = encode_prompts(tokenizer, records, max_prompt_length=max_prompt_length)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token: SFT targets need an end-of-turn token")
    targets = tokenizer([completion_text(r) for r in kept], add_special_tokens=False)["input_ids"] if kept else []
    rows = []
    for p, t, r in zip(prompts, targets, kept):
        if len(t) + 1 > max_completion_length:
            drops["completion_too_long"] += 1
            continue
        rows.append((p, list(t) + [eos], r))
    if not rows:
        raise ValueError(f"SFT: no example left after filtering ({dict(drops)}); raise the length limits")
    width = prompt_width or max(len(p) for p, _, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    n, c = len(rows), max_completion_length
    ids = np.full((n, width + c), pad, np.int32)
    attn = np.zeros((n, width + c), np.int32)
    loss = np.zeros((n, c), np.float32)
    for i, (p, t, _) in enumerate(rows):
        if len(p) > width:
            raise ValueError(f"SFT: prompt of record {rows[i][2].id!r} has {len(p)} tokens > prompt_width {width}")
        ids[i, width - len(p) : width] = p
        ids[i, width : width + len(t)] = t
        attn[i, width - len(p) : width + len(t)] = 1
        loss[i, : len(t)] = 1.0
    return SFTData(ids, attn, loss, width, [r for _, _, r in rows], drops)


def sft_loss(model_config: ModelConfig, params: dict, input_ids, attention_mask, loss_mask, prompt_width: int):
    """Mean negative log-likelihood over the loss-mask tokens. input_ids / attention_mask
    [B, P + C]; loss_mask [B, C]. Only the C completion positions meet the lm_head."""
    completion_len = input_ids.shape[1] - prompt_width
    lp, _ = sequence_logprobs(
        model_config, params, input_ids, attention_mask, temperature=1.0, completion_len=completion_len
    )
    lp = lp[:, prompt_width:]
    return -jnp.sum(lp * loss_mask) / jnp.maximum(jnp.sum(loss_mask), 1.0)


@functools.partial(jax.jit, static_argnames=("model_config", "optimizer", "prompt_width", "lora"), donate_argnums=(0,))
def sft_step(
    state: TrainState,
    input_ids,
    attention_mask,
    loss_mask,
    base=None,
    *,
    model_config: ModelConfig,
    optimizer: optax.GradientTransformation,
    prompt_width: int,
    lora: LoraSettings = LORA_OFF,
) -> tuple[TrainState, jax.Array]:
    """One AdamW update on a batch; returns (new state, loss before the update). With LoRA the
    state holds the adapters and `base` is the frozen base they are attached to."""
    policy = (lambda a: attach(jax.lax.stop_gradient(base), a, lora)) if lora.enabled else (lambda p: p)
    loss, grads = jax.value_and_grad(
        lambda p: sft_loss(model_config, policy(p), input_ids, attention_mask, loss_mask, prompt_width)
    )(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state), loss


def encode_for_run(config, tokenizer: Any, records: Sequence[ToolRecord]) -> SFTData:
    """`encode_sft` at the run's limits: prompts up to `data.max_prompt_length` tokens, targets
    (stop token included) up to `sft.max_completion_length`, 0 meaning `rollout.max_new_tokens`."""
    completion = int(config.sft.max_completion_length or config.rollout.max_new_tokens)
    return encode_sft(
        tokenizer, records, max_prompt_length=int(config.data.max_prompt_length), max_completion_length=completion
    )


def init_sft_state(
    config, model_config: ModelConfig, params: dict, *, mesh=None
) -> tuple[TrainState, optax.GradientTransformation]:
    """A fresh SFT state of `params` (with LoRA, the adapters; copied, since the step donates its
    state) and its optimizer."""
    optimizer = make_optimizer(sft_optimizer_settings(config))
    lora = lora_settings(config)
    if mesh is not None and lora.enabled:
        params = jax.device_put(params, adapter_sharding(model_config, lora, mesh, TRAIN_RULES))
    elif mesh is not None:
        params = shard_params(params, model_config, mesh, TRAIN_RULES)
    params = jax.tree.map(jnp.copy, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)), optimizer


def sft_loop(
    config,
    model_config: ModelConfig,
    state: TrainState,
    optimizer,
    data: SFTData,
    *,
    mesh=None,
    start_step: int = 0,
    steps: int,
    time_budget_s: float | None = None,
    log_fn=None,
    should_stop=None,
    base=None,
) -> tuple[TrainState, dict]:
    """Runs up to `steps` updates from data position `start_step` (a seeded shuffle of the
    examples, cycled), stopping early once `time_budget_s` seconds of steps have passed, or when
    `should_stop()` (checked after each step; metrics["interrupted"]). `log_fn(step, dict)`
    receives the periodic mean loss. With LoRA, `base` is the frozen base."""
    lora = lora_settings(config)
    if lora.enabled and base is None:
        raise ValueError("SFT with LoRA (config.lora.rank > 0) needs the frozen base")
    bs, n, log_every = int(config.sft.batch_size), len(data), int(config.sft.log_every)
    put = (lambda x: jax.device_put(x, batch_sharding(mesh, TRAIN_RULES, x.ndim, x.shape[0]))) if mesh else jnp.asarray
    rng = np.random.default_rng(int(config.seed) + 7919)
    order = np.concatenate([rng.permutation(n) for _ in range(-(-(start_step + steps) * bs // n) + 1)])
    losses, times = [], []
    interrupted = False
    t_start = time.perf_counter()
    for step in range(start_step, start_step + steps):
        if time_budget_s is not None and time.perf_counter() - t_start >= time_budget_s:
            break
        if losses and should_stop is not None and should_stop():
            interrupted = True
            break
        idx = order[step * bs : (step + 1) * bs]
        t0 = time.perf_counter()
        state, loss = sft_step(
            state,
            put(data.input_ids[idx]),
            put(data.attention_mask[idx]),
            put(data.loss_mask[idx]),
            base if lora.enabled else None,
            model_config=model_config,
            optimizer=optimizer,
            prompt_width=data.prompt_width,
            lora=lora,
        )
        loss = float(loss)
        if not np.isfinite(loss):
            raise FloatingPointError(f"SFT loss is {loss} at step {step + 1}: lower config.sft.lr")
        losses.append(loss)
        times.append(time.perf_counter() - t0)
        if log_fn is not None and len(losses) % log_every == 0:
            log_fn(step + 1, {"sft_loss": float(np.mean(losses[-log_every:])), "sft_step_time": times[-1]})
    metrics = {
        "sft_steps": len(losses),
        "interrupted": interrupted,
        "sft_examples": n,
        "sft_drops": dict(data.drops),
        "sft_losses": losses,
        "sft_final_loss": float(np.mean(losses[-10:])) if losses else float("nan"),
        "sft_seconds": time.perf_counter() - t_start,
        "sft_step_times": times,
    }
    return state, metrics


def run_sft(
    config,
    model_config: ModelConfig,
    params: dict,
    tokenizer: Any,
    records: Sequence[ToolRecord],
    *,
    mesh=None,
    steps: int | None = None,
    start_step: int = 0,
    data: SFTData | None = None,
    log_fn=None,
    should_stop=None,
    probe=None,
    adapters=None,
) -> tuple[dict, dict]:
    """SFT for `steps` updates (default `config.sft.warm_start_steps`) on `records`, cycling a
    seeded shuffle of them. Returns (params, metrics: losses, step times, example counts).
    The caller's `params` are left intact; `data` reuses an already encoded `SFTData`.
    With LoRA, `params` is the frozen base and the adapters are trained, from `adapters` (default:
    fresh, `run_setup.initial_adapters`); the adapters are returned in place of the params.

    With `probe(trained) -> {"accuracy", "format_failure_rate", ...}` (`trained`: the params, or
    with LoRA the adapters) and `sft.stop_accuracy` > 0, the probe runs every `sft.probe_every`
    steps before the cap and SFT ends at the first one reaching the stop band (`reached_stop_band`): the warm start then
    stops once sampled groups hold right answers as well as wrong ones, whatever the seed, instead
    of after a fixed count (`metrics["sft_probes"]`; `sft_stopped_in_band` is False when the cap
    came first or a probe overshot the band's top)."""
    steps = int(config.sft.warm_start_steps if steps is None else steps)
    data = data or encode_for_run(config, tokenizer, records)
    lora = lora_settings(config)
    if lora.enabled and adapters is None:
        adapters = initial_adapters(config, model_config, params, mesh)
    trainable = adapters if lora.enabled else params
    state, optimizer = init_sft_state(config, model_config, trainable, mesh=mesh)
    stop_accuracy = float(config.sft.stop_accuracy) if probe is not None else 0.0
    chunk = int(config.sft.probe_every) if stop_accuracy else max(steps, 1)
    done, parts, probes = 0, [], []
    while done < steps:
        state, part = sft_loop(
            config,
            model_config,
            state,
            optimizer,
            data,
            mesh=mesh,
            start_step=start_step + done,
            steps=min(chunk, steps - done),
            log_fn=log_fn,
            should_stop=should_stop,
            base=params if lora.enabled else None,
        )
        parts.append(part)
        done += part["sft_steps"]
        if part["interrupted"] or not stop_accuracy or done >= steps:  # a probe at the cap decides nothing
            break
        acc = probe(state.params)
        probes.append(
            {"sft_steps": start_step + done, **{k: acc[k] for k in ("accuracy", "format_failure_rate", "num_scored")}}
        )
        if log_fn is not None:
            log_fn(start_step + done, {"sft_probe_accuracy": acc["accuracy"]})
        if reached_stop_band(config, acc):
            break
    metrics = _joined(parts, data)
    if stop_accuracy:
        metrics["sft_probes"] = probes
        metrics["sft_stopped_by_probe"] = bool(probes) and reached_stop_band(config, probes[-1])
        metrics["sft_stopped_in_band"] = metrics["sft_stopped_by_probe"] and in_stop_band(config, probes[-1])
    return state.params, metrics


def reached_stop_band(config, probe: dict) -> bool:
    """Whether a probe ends the warm start: the format is learnt (`format_failure_rate` at most
    `sft.stop_format_failure_max`) and exact-call accuracy is at least `sft.stop_accuracy`."""
    s = config.sft
    return probe["format_failure_rate"] <= s.stop_format_failure_max and probe["accuracy"] >= s.stop_accuracy


def in_stop_band(config, probe: dict) -> bool:
    """Whether a probe lies inside the band GRPO learns from: stop-worthy, and accuracy at most
    `sft.stop_accuracy_max`, so that sampled groups still hold wrong answers."""
    return reached_stop_band(config, probe) and probe["accuracy"] <= config.sft.stop_accuracy_max


def summary_metrics(metrics: dict) -> dict:
    """`run_sft`'s metrics without the per-step lists (`sft_losses`, `sft_step_times`): what a
    run's summary.json keeps of its warm start."""
    return {k: v for k, v in metrics.items() if k not in ("sft_losses", "sft_step_times")}


def _joined(parts: list[dict], data: SFTData) -> dict:
    """One metrics dict for consecutive `sft_loop` calls on `data` (none: no step was run)."""
    losses = [x for p in parts for x in p["sft_losses"]]
    return {
        "sft_steps": len(losses),
        "interrupted": any(p["interrupted"] for p in parts),
        "sft_examples": len(data),
        "sft_drops": dict(data.drops),
        "sft_losses": losses,
        "sft_final_loss": float(np.mean(losses[-10:])) if losses else float("nan"),
        "sft_seconds": sum(p["sft_seconds"] for p in parts),
        "sft_step_times": [x for p in parts for x in p["sft_step_times"]],
    }


def sft_baseline(config) -> dict:
    """SFT only (the paper's SFT baseline) for `sft.warm_start_steps` steps, then greedy held-out
    accuracy. The stop band (`sft.stop_*`) is not applied: it ends a warm start for GRPO, and a
    baseline trains its whole budget. On every process of a multi-host run; process 0 prints and writes
    `<output_dir>/sft_summary.json`. Returns that summary."""
    distributed.initialize_from_config(config.distributed)
    main_process = distributed.is_main()
    distributed.all_or_none(
        "output setup",
        lambda: distributed.check_writable(config.output_dir, "config.output_dir") if main_process else None,
    )
    setup = setup_run(config)
    params, metrics = run_sft(
        config,
        setup.model_config,
        setup.params,
        setup.tokenizer,
        setup.train_records,
        mesh=setup.mesh,
        log_fn=lambda s, m: print(f"sft step {s}: loss {m['sft_loss']:.4f}", flush=True) if main_process else None,
    )
    acc = held_out_accuracy(config, setup, policy_params(config, setup.model_config, params, setup.params, setup.mesh))
    summary = {
        "accuracy": acc,
        **{k: v for k, v in metrics.items() if k != "sft_step_times"},
    }
    if main_process:
        print(
            f"SFT {metrics['sft_steps']} steps ({metrics['sft_seconds']:.0f} s): held-out exact-call accuracy "
            f"{acc['accuracy']:.3f} on {acc['num_scored']} prompts",
            flush=True,
        )
        os.makedirs(config.output_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, "sft_summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    return summary


def main(argv=None):
    """`python -m tooln1_jax.sft [--config configs/tiny_cpu.py] [--config.sft.warm_start_steps=N]`."""
    cli.run(sft_baseline, argv, __doc__)


if __name__ == "__main__":
    main()
