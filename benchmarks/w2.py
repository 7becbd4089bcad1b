"""Workload W2 (../shared/benchmarks/W2.md): our rollout and GRPO update against transformers'
`generate` and a plain PyTorch GRPO update, in one process, on the same real weights and prompts.

    python benchmarks/w2.py [--prompts 8] [--group 8] [--max-new-tokens 256] [--micro-batch-size 4]

SmolLM2-135M-Instruct (float32, real weights) and its tokenizer; the first `--prompts` BFCL v3
`live_multiple` items with a single accepted answer, in id order, rendered as training renders
prompts (`lora_w2.tokenizer_and_prompts`). The defaults are W2 itself; on a 2-core CPU one full
W2 update takes over an hour a side, so smaller `--prompts` / `--group` give a reduced W2 with the
same prompts, model and lengths, and the command line is printed with the figures.

1. Rollout. Ours: `rollouts.generate_and_score` (temperature 0.7, top_p 1, no top-k, stop at
   the model's stop ids), run twice: the first call's extra time is its compile time.
   transformers: `generate` on the same left-padded prompt ids, repeated `--group` times, same
   sampling settings and stop ids. Generated tokens count up to and including the stop.
2. Update, on our rollout's sequences (rewards from the project's reward, or random {0, 1} when all
   are equal). Ours: the trainer's update (`bucketed_update.update_on_real_lengths` with
   `grpo_step.benchmark_step`'s settings: clipped surrogate 0.2, k3 KL 1e-3 to a frozen fp32
   reference, AdamW lr 1e-6, weight decay 0.01, clip 1.0), loss on the completion tokens: rows
   ordered by length, each micro-batch cut to its own length buckets. The first of the
   `--reps` + 1 updates compiles; its extra time over the median of the others is reported.
   PyTorch: the same loss on the same rows, padded to the batch's longest prompt and longest
   completion (as a plain collator pads), with a `LlamaForCausalLM` policy and a frozen copy as
   the reference, micro-batches accumulated, `torch.optim.AdamW`, `clip_grad_norm_`.
Prints tokens/s and seconds, the ratios (ours against theirs), the rows' lengths and the peak RSS.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from grpo_step import TEMPERATURE, benchmark_step  # noqa: E402
from layer_profile import best_seconds  # noqa: E402
from lora_w2 import load_model, sample_w2, tokenizer_and_prompts, update_rewards  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from w1 import load_avg, peak_rss_gb  # noqa: E402

from tooln1_jax.assets import smollm2_hf_dir  # noqa: E402
from tooln1_jax.bucketed_update import batch_plan, update_on_real_lengths  # noqa: E402
from tooln1_jax.data.prompt import pad_id_of, stop_token_ids  # noqa: E402
from tooln1_jax.grpo import group_advantages  # noqa: E402

CLIP, KL = 0.2, 1e-3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8, help="BFCL live_multiple prompts (first N, id order)")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4, help="rows per micro-batch, both updates")
    parser.add_argument("--reps", type=int, default=2, help="timed updates per side after the first")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def our_rollout(config, params, tokenizer, prompt_ids, records, args):
    """(rollout batch, compile_s, run_s): two identical sampler calls, the second timed alone."""
    t0 = time.perf_counter()
    sample_w2(config, params, tokenizer, prompt_ids, records, args)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    ro = sample_w2(config, params, tokenizer, prompt_ids, records, args)
    second = time.perf_counter() - t0
    return ro, first - second, second


def hf_rollout(model, prompt_ids, stops, pad_id, args):
    """(generated tokens per row, seconds): transformers' sampling on the same left-padded batch."""
    rows = [p for p in prompt_ids for _ in range(args.group)]
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            temperature=TEMPERATURE,
            top_p=1.0,
            top_k=0,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=list(stops),
            pad_token_id=pad_id,
        )
    seconds = time.perf_counter() - t0
    new = out[:, width:].numpy()
    is_stop = np.isin(new, list(stops))
    lengths = np.where(is_stop.any(1), is_stop.argmax(1) + 1, new.shape[1])
    return lengths, seconds


def trim_to_longest(batch: dict, prompt_width: int) -> tuple[dict, int]:
    """(batch, completion columns): the [N, T] arrays cut to the batch's longest prompt and longest
    completion, as a plain PyTorch update pads (one width for the whole batch)."""
    mask = batch["attention_mask"]
    left = prompt_width - int(mask[:, :prompt_width].sum(1).max())
    completion = int(mask[:, prompt_width:].sum(1).max())
    cut = {k: v if v.ndim == 1 else v[:, left : prompt_width + completion] for k, v in batch.items()}
    return cut, completion


def torch_update(policy, reference, optimizer, batch, completion_len: int, micro: int) -> float:
    """One GRPO update in plain PyTorch (the loss of `grpo_step.benchmark_step`) on `batch`, every
    micro-batch at the batch's width; returns seconds."""
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    attn = torch.tensor(batch["attention_mask"], dtype=torch.long)
    loss_mask = torch.tensor(batch["loss_mask"][:, -completion_len:])
    old = torch.tensor(batch["old_logprobs"][:, -completion_len:])
    adv = torch.tensor(batch["advantages"])
    positions = (attn.cumsum(1) - 1).clamp(min=0)
    tokens = loss_mask.sum()
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for s in range(0, ids.shape[0], micro):
        rows = slice(s, s + micro)
        target = ids[rows, -completion_len:]

        def logprobs(model, rows=rows, target=target):
            out = model(ids[rows], attention_mask=attn[rows], position_ids=positions[rows]).logits
            logits = out[:, -completion_len - 1 : -1].float() / TEMPERATURE
            return torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]

        with torch.no_grad():
            ref = logprobs(reference)
        lp = logprobs(policy)
        ratio = torch.exp(lp - old[rows])
        a = adv[rows, None]
        surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - CLIP, 1 + CLIP) * a)
        kl = torch.exp(ref - lp) - (ref - lp) - 1  # k3
        loss = (-(surrogate - KL * kl) * loss_mask[rows]).sum() / tokens
        loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    return time.perf_counter() - t0


def our_update(config, params, batch, prompt_width: int, args):
    """(compile_s, [seconds per update], plan) of the trainer's update (`update_on_real_lengths`):
    micro-batches ordered by length, each cut to its own buckets. The first update compiles
    every program it needs; its extra time over the median of the later ones is the compile time."""
    state, ref, update, _ = benchmark_step(
        config,
        params,
        0,
        ref_dtype=None,
        micro_batch_size=args.micro_batch_size,
        chunk_size=128,
        completion_len=None,
        bucketed=True,
    )
    times = []
    for _ in range(args.reps + 1):
        t0 = time.perf_counter()
        state, metrics = update_on_real_lengths(update, state, ref, batch, prompt_width)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return times[0] - statistics.median(times[1:]), times, batch_plan(batch, prompt_width, args.micro_batch_size)


def layer_matmul_rates(config, tokens: int = 2048, reps: int = 5) -> str:
    """float32 GFLOP/s of XLA (jnp.dot) and PyTorch (torch.mm) on the model's own layer products
    ([tokens, D] x [D, F], [tokens, F] x [F, D], [tokens, D] x [D, D]), best of `reps` each:
    what bounds an update at equal tokens on this machine."""
    dot, out = jax.jit(jax.numpy.dot), []
    d, f = config.hidden_size, config.intermediate_size
    for k, n in ((d, f), (f, d), (d, d)):
        a, b = np.random.rand(tokens, k).astype(np.float32), np.random.rand(k, n).astype(np.float32)
        ja, jb, ta, tb = jax.numpy.asarray(a), jax.numpy.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        xla = best_seconds(functools.partial(lambda x, y: dot(x, y).block_until_ready(), ja, jb), reps)
        pt = best_seconds(functools.partial(torch.mm, ta, tb), reps)
        flop = 2 * tokens * k * n / 1e9
        out.append(f"[{tokens},{k}]x[{k},{n}] XLA {flop / xla:.0f} / torch {flop / pt:.0f} GFLOP/s")
    return "; ".join(out)


def main():
    args = parse_args()
    print(f"W2 {' '.join(sys.argv[1:]) or '(full)'}; JAX {jax.default_backend()}; load avg {load_avg()}", flush=True)
    tokenizer, prompt_ids, records = tokenizer_and_prompts(args.prompts)
    config, params = load_model()
    stops, pad_id = stop_token_ids(tokenizer, config), pad_id_of(tokenizer)
    print(f"layer matmuls: {layer_matmul_rates(config)}", flush=True)

    ro, ours_compile, ours_s = our_rollout(config, params, tokenizer, prompt_ids, records, args)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir(), dtype=torch.float32).eval()
    hf_lengths, hf_s = hf_rollout(model, prompt_ids, stops, pad_id, args)
    ours_tps, hf_tps = float(ro.lengths.sum()) / ours_s, float(hf_lengths.sum()) / hf_s
    print(
        f"prompts: {[len(p) for p in prompt_ids]} tokens, padded to {ro.prompt_width} (ours) / "
        f"{max(map(len, prompt_ids))} (transformers)\n"
        f"generated per row, min / median / max: ours {ro.lengths.min()} / {np.median(ro.lengths):.0f} / "
        f"{ro.lengths.max()} ({np.mean(ro.stopped):.0%} stopped), transformers {hf_lengths.min()} / "
        f"{np.median(hf_lengths):.0f} / {hf_lengths.max()}\n"
        f"rollout: ours {ours_tps:.1f} tok/s ({ours_s:.1f} s, compile {ours_compile:.1f} s), transformers "
        f"{hf_tps:.1f} tok/s ({hf_s:.1f} s): {ours_tps / hf_tps:.2f}x; peak RSS {peak_rss_gb():.2f} GB",
        flush=True,
    )

    rewards, _ = update_rewards(ro, args.seed)
    batch = dict(
        input_ids=ro.input_ids,
        attention_mask=ro.attention_mask,
        loss_mask=ro.loss_mask,
        old_logprobs=ro.old_logprobs,
        advantages=np.asarray(group_advantages(rewards, args.group), np.float32),
    )
    compile_s, ours, plan = our_update(config, params, batch, ro.prompt_width, args)
    del params
    trimmed, completion_len = trim_to_longest(batch, ro.prompt_width)
    policy = model.train()
    reference = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.01)
    theirs = [
        torch_update(policy, reference, optimizer, trimmed, completion_len, args.micro_batch_size)
        for _ in range(args.reps + 1)
    ]
    ours_med, theirs_med = statistics.median(ours[1:]), statistics.median(theirs[1:])
    real = int(batch["attention_mask"].sum())
    ours_cols = sum(len(mb.rows) * (mb.prompt_cols + mb.completion_cols) for mb in plan)
    widths = sorted({(mb.prompt_cols, mb.completion_cols) for mb in plan})
    print(
        f"update on {batch['input_ids'].shape[0]} rows, {real} real tokens: ours {ours_cols} padded tokens in "
        f"{len(plan)} micro-batches of (prompt, completion) buckets {widths}; PyTorch "
        f"{trimmed['input_ids'].size} ({trimmed['input_ids'].shape[1]} columns)\n"
        f"update: ours {' / '.join(f'{t:.1f}' for t in ours)} s (the first compiles {compile_s:.1f} s more), "
        f"PyTorch {' / '.join(f'{t:.1f}' for t in theirs)} s: median {theirs_med / ours_med:.2f}x PyTorch's speed; "
        f"peak RSS {peak_rss_gb():.2f} GB; load avg {load_avg()}",
        flush=True,
    )


if __name__ == "__main__":
    main()
