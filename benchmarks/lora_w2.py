"""GRPO update on workload W2 (../shared/benchmarks/W2.md): LoRA (rank 16, alpha 32, all seven
targets) against the full-parameter update, on the same real sequences.

    python benchmarks/lora_w2.py [--prompts 8] [--group 8] [--max-new-tokens 256] [--micro-batch-size 4]
                                 [--remat full] [--npz runs/lora_w2_rollout.npz]

Real SmolLM2-135M-Instruct weights (float32) and tokenizer; the first `--prompts` BFCL v3
`live_multiple` items with a single accepted answer, in id order, rendered as training renders
prompts. One rollout with the project's sampler (group `--group`, temperature 0.7, top_p 1, at
most `--max-new-tokens` new tokens, stopping at the model's stop ids) is scored with the
project's reward and cached to `--npz` (random {0, 1} rewards if all are equal), so both arms
update on the same sequences and the rollout runs once (delete the file, or use another path,
to sample again).

Each arm runs in its own subprocess, so its peak resident memory (ru_maxrss) is its own:
- full: fp32 policy, a frozen fp32 reference copy, AdamW on every parameter;
- lora: the frozen fp32 base (also the reference, no copy), fp32 adapters, AdamW on the adapters.
Each loads the weights, builds the batch from the cached rollout (old log-probs are the
sampler's, as in training), compiles the step (timed), then runs it `--reps` times (each timed).
Loss on completion tokens only (log-probs of the last max-new-tokens positions), clipped
surrogate (0.2), k3 KL 1e-3, AdamW lr 1e-6 (weight decay 0.01, clip 1.0, as grpo_step.py).
Both arms use the same micro-batch size, remat policy and log-prob chunk size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from w1 import load_avg, peak_rss_gb  # noqa: E402

TEMPERATURE, TOP_P, CATEGORY = 0.7, 1.0, "live_multiple"
RESULT = "RESULT "


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8, help="BFCL live_multiple prompts (first N, id order)")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO group size)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="rollout limit (and the loss's positions)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="rows per micro-batch, both arms")
    parser.add_argument("--remat", choices=["none", "full", "dots"], default="full", help="layer remat, both arms")
    parser.add_argument("--chunk-size", type=int, default=128, help="positions per log-prob chunk, both arms")
    parser.add_argument("--reps", type=int, default=2, help="timed steps after compile")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank, all targets)")
    parser.add_argument("--seed", type=int, default=0, help="rollout key and fallback rewards")
    parser.add_argument("--npz", default=None, help="rollout cache (default runs/lora_w2_<prompts>x<group>_<new>.npz)")
    parser.add_argument("--arms", default="full,lora", help="which arms to run, comma-separated")
    parser.add_argument(
        "--shape-only",
        default="",
        help="ROWSxWIDTH: no rollout, no steps; compile both arms on a dummy batch of that shape (loss on the "
        "last --max-new-tokens columns) and print XLA's memory analysis and the RSS after compiling",
    )
    parser.add_argument("--stage", choices=["main", "rollout", "full", "lora"], default="main", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.npz = args.npz or os.path.join("runs", f"lora_w2_{args.prompts}x{args.group}_{args.max_new_tokens}.npz")
    return args


def tokenizer_and_prompts(num_prompts: int):
    from transformers import AutoTokenizer

    from tooln1_jax.assets import smollm2_hf_dir
    from tooln1_jax.data.bfcl import single_answer_records
    from tooln1_jax.data.prompt import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir())
    records, _ = single_answer_records()
    records = [r for r in records if r.id.startswith(CATEGORY + "_")][:num_prompts]
    ids, kept, _ = encode_prompts(tokenizer, records, max_prompt_length=1 << 20)
    return tokenizer, ids, kept


def load_model(remat: str = "none"):
    import jax.numpy as jnp

    from tooln1_jax.assets import smollm2_hf_dir
    from tooln1_jax.models import load_pretrained

    config, params = load_pretrained(smollm2_hf_dir(), dtype=jnp.float32, compute_dtype="float32")
    return config.replace(remat=remat), params


def sample_w2(config, params, tokenizer, prompt_ids, records, args):
    """W2's rollout with the project's sampler (`args.group` samples per prompt, temperature 0.7,
    top_p 1, at most `args.max_new_tokens`, stopping at the model's stop ids), scored."""
    import jax

    from tooln1_jax.rollouts import generate_and_score

    return generate_and_score(
        config,
        params,
        tokenizer,
        prompt_ids,
        records,
        num_samples=args.group,
        max_new_tokens=args.max_new_tokens,
        temperature=TEMPERATURE,
        top_p=TOP_P,
        rng=jax.random.key(args.seed),
    )


def update_rewards(ro, seed: int) -> tuple[np.ndarray, bool]:
    """(rewards [N], random?): the reward's own, or random {0, 1} when all rows are equal (an
    update with zero advantages would measure nothing)."""
    if np.all(ro.rewards == ro.rewards[0]):
        return np.random.default_rng(seed).integers(0, 2, ro.num_rows).astype(np.float32), True
    return ro.rewards, False


def rollout(args) -> None:
    """Samples once and caches the rows' token arrays, the sampler's log-probs and the rewards."""
    tokenizer, prompt_ids, records = tokenizer_and_prompts(args.prompts)
    config, params = load_model()
    t0 = time.perf_counter()
    ro = sample_w2(config, params, tokenizer, prompt_ids, records, args)
    seconds = time.perf_counter() - t0
    rewards, random_rewards = update_rewards(ro, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.npz)), exist_ok=True)
    np.savez(
        args.npz,
        input_ids=ro.input_ids,
        attention_mask=ro.attention_mask,
        loss_mask=ro.loss_mask,
        old_logprobs=ro.old_logprobs,
        rewards=rewards,
        reward_mix=ro.rewards,
        random_rewards=random_rewards,
        lengths=ro.lengths,
        stopped=ro.stopped,
        prompt_lengths=np.asarray([len(p) for p in prompt_ids], np.int32),
        prompt_ids=np.asarray([r.id for r in records]),
        prompt_width=ro.prompt_width,
        group=args.group,
        max_new_tokens=args.max_new_tokens,
    )
    print(
        f"rollout: {ro.num_rows} rows, prompt width {ro.prompt_width}, {int(ro.lengths.sum())} tokens generated "
        f"in {seconds:.0f} s (compile included), reward mean {float(ro.rewards.mean()):.3f}"
        f"{' (all equal: random {0, 1} rewards used)' if random_rewards else ''}; "
        f"peak RSS {peak_rss_gb():.2f} GB; saved {args.npz}"
    )


def load_batch(path: str) -> tuple[dict, dict]:
    from tooln1_jax.grpo import group_advantages

    z = np.load(path)
    batch = {k: z[k] for k in ("input_ids", "attention_mask", "loss_mask", "old_logprobs")}
    batch["advantages"] = np.asarray(group_advantages(z["rewards"], int(z["group"])), np.float32)
    return batch, {k: z[k] for k in z.files}


def run_arm(args) -> None:
    """One arm: load, compile (timed), `reps` timed steps; prints a RESULT json line."""
    import jax
    from grpo_step import benchmark_step  # jax only in the children: their peak RSS is the figure

    if args.shape_only:
        rows, width = (int(x) for x in args.shape_only.split("x"))
        batch = dict(
            input_ids=np.zeros((rows, width), np.int32),
            attention_mask=np.ones((rows, width), np.int32),
            loss_mask=np.zeros((rows, width), np.float32),
            old_logprobs=np.zeros((rows, width), np.float32),
            advantages=np.zeros(rows, np.float32),
        )
        batch["loss_mask"][:, -args.max_new_tokens :] = 1.0
        meta = dict(max_new_tokens=args.max_new_tokens)
    else:
        batch, meta = load_batch(args.npz)
    config, params = load_model(args.remat)
    state, ref, step, _ = benchmark_step(
        config,
        params,
        args.lora_rank if args.stage == "lora" else 0,
        ref_dtype=None,
        micro_batch_size=args.micro_batch_size,
        chunk_size=args.chunk_size,
        completion_len=int(meta["max_new_tokens"]),
    )
    n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
    del params
    t0 = time.perf_counter()
    compiled = step.lower(state, ref, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    print(
        f"{args.stage}: {batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} compiled in {compile_s:.1f} s; "
        f"XLA memory analysis: arguments {mem.argument_size_in_bytes / 1e9:.2f} GB, outputs "
        f"{mem.output_size_in_bytes / 1e9:.2f} GB, temporaries {mem.temp_size_in_bytes / 1e9:.2f} GB; "
        f"peak RSS so far {peak_rss_gb():.2f} GB",
        flush=True,
    )
    if args.shape_only:
        return
    times, metrics = [], None
    for _ in range(args.reps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, ref, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
        print(f"{args.stage}: step {len(times)} {times[-1]:.1f} s; load avg {load_avg()}", flush=True)
    result = dict(
        arm=args.stage,
        trainable_params=int(n_trainable),
        compile_s=compile_s,
        step_s=times,
        peak_rss_gb=peak_rss_gb(),
        load_avg=load_avg(),
        loss=float(metrics["loss"]),
        kl=float(metrics["kl"]),
        grad_norm=float(metrics["grad_norm"]),
        finite=bool(metrics["finite"]),
    )
    print(RESULT + json.dumps(result), flush=True)


def child(args, stage: str) -> dict | None:
    """Runs this script at `stage` in a fresh process; returns its RESULT (None for the rollout)."""
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--stage", stage]
    out = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            if line.startswith(RESULT):
                out = json.loads(line[len(RESULT) :])
            else:
                print(f"  [{stage}] {line.rstrip()}", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed with exit status {proc.returncode}")
    return out


def summary(args, results: dict) -> None:
    _, meta = load_batch(args.npz)
    lengths = meta["lengths"]
    rows, width = meta["input_ids"].shape
    print(
        f"W2 sequences: {rows} rows x {width} columns (prompt width {int(meta['prompt_width'])} + "
        f"{int(meta['max_new_tokens'])}); prompt tokens {meta['prompt_lengths'].tolist()}; "
        f"completion lengths min {int(lengths.min())} / median {float(np.median(lengths)):.0f} / "
        f"max {int(lengths.max())}, {float(np.mean(meta['stopped'])):.0%} stopped; reward mix "
        f"{float(np.mean(meta['reward_mix'])):.3f}{' (random {0,1} used)' if bool(meta['random_rewards']) else ''}"
    )
    print(
        f"settings (both arms): micro-batch {args.micro_batch_size}, remat {args.remat}, chunk {args.chunk_size}, "
        f"loss on the last {int(meta['max_new_tokens'])} positions, k3 KL 1e-3, AdamW lr 1e-6, "
        f"temperature {TEMPERATURE}; lora rank {args.lora_rank} alpha {2 * args.lora_rank}, all targets"
    )
    for arm, r in results.items():
        print(
            f"{arm:>4}: {r['trainable_params'] / 1e6:.2f}M trainable; compile {r['compile_s']:.1f} s; update "
            f"{' / '.join(f'{t:.1f}' for t in r['step_s'])} s; peak RSS {r['peak_rss_gb']:.2f} GB; loss "
            f"{r['loss']:.5f} kl {r['kl']:.2e} grad_norm {r['grad_norm']:.3g} finite {r['finite']}; "
            f"load avg {r['load_avg']}"
        )
    if {"full", "lora"} <= set(results):
        f, lo = results["full"], results["lora"]
        t_ratio = statistics.median(lo["step_s"]) / statistics.median(f["step_s"])
        print(
            f"LoRA / full: update time {t_ratio:.2f}, peak RSS {lo['peak_rss_gb'] / f['peak_rss_gb']:.2f}, "
            f"compile {lo['compile_s'] / f['compile_s']:.2f}"
        )


def main():
    args = parse_args()
    if args.stage == "rollout":
        return rollout(args)
    if args.stage in ("full", "lora"):
        return run_arm(args)
    print(f"W2 LoRA vs full GRPO update; load avg {load_avg()}", flush=True)
    if args.shape_only:
        for arm in args.arms.split(","):
            child(args, arm)
        return
    if not os.path.exists(args.npz):
        child(args, "rollout")
    else:
        print(f"  rollout cached in {args.npz}")
    results = {arm: child(args, arm) for arm in args.arms.split(",")}
    summary(args, results)
    print(f"load avg {load_avg()}")


if __name__ == "__main__":
    main()
