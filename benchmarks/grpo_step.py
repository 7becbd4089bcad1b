"""GRPO update speed on workload W1 (../shared/benchmarks/W1.md): one optimizer step on 64
sequences x 256 tokens (128 prompt + 128 completion, loss on the completion), random Qwen2
(27M params, float32), AdamW lr 1e-6, k3 KL 1e-3 against a frozen reference copy, random
{0, 1} rewards in groups of 8.

    python benchmarks/grpo_step.py [--micro-batch-size 16] [--reps 3] [--remat none] [--lora-rank 16]

With `--lora-rank R` the step trains rank-R LoRA adapters on every target (alpha = 2R) of the
frozen base, stored in `--ref-dtype`, which is also the reference (no copy); the nominal FLOPs
then count the base's backward as input gradients only (4 x params x tokens with the forward).

The timed step (`make_grpo_step`) includes the reference log-probs (a forward of the frozen
copy inside the same jit), the policy forward and backward over every micro-batch, clipping
and AdamW. Old log-probs come in the batch (as from the sampler), so they are NOT inside; the
cost of recomputing them (`compute_logprobs`, when the sampler's cannot be used) is timed
separately and added in the "with old log-probs" line.

GFLOP/s are nominal: 6 x params x tokens for the policy forward + backward plus 2 x params x
tokens per extra forward (the reference; the old log-probs in the second line), against a
float32 matmul measured in the same process. The machine may be shared: the load average is
printed, and the ratio to the matmul rate is the comparable figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from w1 import W1, load_avg, peak_rss_gb  # noqa: E402

from tooln1_jax.bucketed_update import make_bucketed_update  # noqa: E402
from tooln1_jax.grpo import (
    LossSettings,  # noqa: E402
    group_advantages,  # noqa: E402
)
from tooln1_jax.models import init_params  # noqa: E402
from tooln1_jax.models.lora import attach, init_adapters  # noqa: E402
from tooln1_jax.optimizer import OptimizerSettings, make_optimizer  # noqa: E402
from tooln1_jax.settings import LoraSettings  # noqa: E402
from tooln1_jax.train_step import compute_logprobs, init_train_state, make_grpo_step, reference_params  # noqa: E402

ROWS, GROUP, PROMPT_LEN, COMPLETION_LEN, TEMPERATURE = 64, 8, 128, 128, 0.7


class MatmulProbe:
    """float32 n^3 matmul rates of this process's JAX backend, sampled between timed steps so
    the 'peak' sees the same machine load as the step."""

    def __init__(self, n: int):
        self.n = n
        self.a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        self.b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        self.mm = jax.jit(jnp.matmul)
        self.mm(self.a, self.b).block_until_ready()
        self.rates: list[float] = []

    def sample(self, reps: int = 3) -> None:
        for _ in range(reps):
            t0 = time.perf_counter()
            self.mm(self.a, self.b).block_until_ready()
            self.rates.append(2 * self.n**3 / (time.perf_counter() - t0) / 1e9)

    @property
    def gflops(self) -> float:
        return statistics.median(self.rates)


def make_batch(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, W1.vocab_size, (ROWS, PROMPT_LEN + COMPLETION_LEN)).astype(np.int32)
    loss_mask = np.zeros(ids.shape, np.float32)
    loss_mask[:, PROMPT_LEN:] = 1.0
    rewards = rng.integers(0, 2, ROWS).astype(np.float32)
    return dict(
        input_ids=ids,
        attention_mask=np.ones_like(ids),
        loss_mask=loss_mask,
        advantages=np.asarray(group_advantages(rewards, GROUP)),
    )


def benchmark_step(
    config, params, lora_rank: int, *, ref_dtype, micro_batch_size, chunk_size, completion_len, bucketed=False
):
    """The benchmarks' GRPO step on `params` (W1 here, W2 in `lora_w2.py` and `w2.py`): AdamW lr
    1e-6, clip 0.2, k3 KL 1e-3. Full (rank 0): the state trains `params`, the reference is a
    frozen copy in `ref_dtype` (None: float32). LoRA (rank R, alpha 2R, every target): the state
    trains fresh adapters and the base, in `ref_dtype`, is the reference (no copy). Returns
    (state, ref, step, lora); with `bucketed`, `step` is the trainer's length-bucketed update
    (`bucketed_update.make_bucketed_update`, run by `update_on_real_lengths`) instead of
    `make_grpo_step`'s one-width step."""
    lora = LoraSettings(rank=lora_rank, alpha=2.0 * lora_rank)
    optimizer = make_optimizer(OptimizerSettings(1e-6, weight_decay=0.01, grad_clip=1.0))
    if lora.enabled:
        ref = params if ref_dtype is None else reference_params(params, dtype=ref_dtype)
        state = init_train_state(init_adapters(config, lora, jax.random.key(1)), optimizer)
    else:
        ref, state = reference_params(params, dtype=ref_dtype), init_train_state(params, optimizer)
    settings = LossSettings(clip_eps=0.2, kl_coef=1e-3, kl_estimator="k3")
    kw = dict(micro_batch_size=micro_batch_size, temperature=TEMPERATURE, chunk_size=chunk_size)
    if bucketed:
        return state, ref, make_bucketed_update(config, optimizer, loss_settings=settings, lora=lora, **kw), lora
    step = make_grpo_step(config, optimizer, completion_len=completion_len, loss_settings=settings, lora=lora, **kw)
    return state, ref, step, lora


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch-size", type=int, default=16, help="rows per micro-batch (gradient accumulation)")
    parser.add_argument("--reps", type=int, default=3, help="timed steps after compile (median reported)")
    parser.add_argument("--remat", choices=["none", "full", "dots"], default="none", help="layer rematerialisation")
    parser.add_argument("--chunk-size", type=int, default=128, help="sequence positions per log-prob chunk")
    parser.add_argument(
        "--all-positions", action="store_true", help="log-probs on all 256 positions, not only the completion"
    )
    parser.add_argument(
        "--ref-dtype", choices=["float32", "bfloat16"], default="float32", help="storage dtype of the reference copy"
    )
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n^3 float32 matmul used as the peak")
    parser.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: full)")
    args = parser.parse_args()

    config = W1.replace(remat=args.remat)
    completion_len = None if args.all_positions else COMPLETION_LEN
    tokens = ROWS * (PROMPT_LEN + COMPLETION_LEN)
    n_params = config.num_params
    print(
        f"W1 GRPO step: {ROWS} x {PROMPT_LEN + COMPLETION_LEN} tokens (loss on last {COMPLETION_LEN}), "
        f"micro-batch {args.micro_batch_size}, remat={args.remat}, ref {args.ref_dtype}, lora rank {args.lora_rank}, "
        f"{n_params / 1e6:.1f}M params; {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"load avg {load_avg()}"
    )

    probe = MatmulProbe(args.matmul_size)
    probe.sample()

    params = init_params(config, jax.random.key(0))
    ref_dtype = None if args.ref_dtype == "float32" else jnp.bfloat16
    state, ref, step, lora = benchmark_step(
        config,
        params,
        args.lora_rank,
        ref_dtype=ref_dtype,
        micro_batch_size=args.micro_batch_size,
        chunk_size=args.chunk_size,
        completion_len=completion_len,
    )
    del params
    batch = make_batch()
    # Old log-probs: what the sampler would return (here: the policy's own, so ratio = 1).
    old_fn = lambda p, b: compute_logprobs(
        config,
        attach(ref, p, lora) if lora.enabled else p,
        b,
        TEMPERATURE,
        chunk_size=args.chunk_size,
        completion_len=completion_len,
        micro_batch_size=args.micro_batch_size,
    )

    t0 = time.perf_counter()
    old = old_fn(state.params, batch).block_until_ready()
    old_compile_and_run = time.perf_counter() - t0
    batch["old_logprobs"] = np.asarray(old)

    t0 = time.perf_counter()
    compiled = step.lower(state, ref, batch).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, ref, batch)  # warm-up run
    jax.block_until_ready(metrics)
    print(
        f"compile {compile_s:.1f} s (step), {old_compile_and_run:.1f} s (old log-probs, compile + first run); "
        f"first step: loss {float(metrics['loss']):.5f} kl {float(metrics['kl']):.2e} "
        f"ratio [{float(metrics['ratio_min']):.6f}, "
        f"{float(metrics['ratio_max']):.6f}] grad_norm {float(metrics['grad_norm']):.3f} "
        f"finite {bool(metrics['finite'])}"
    )

    step_times, old_times, step_cpu = [], [], []
    for _ in range(args.reps):
        probe.sample()
        t0 = time.perf_counter()
        jax.block_until_ready(old_fn(state.params, batch))
        old_times.append(time.perf_counter() - t0)
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, ref, batch)
        jax.block_until_ready(metrics)
        step_times.append(time.perf_counter() - t0)
        step_cpu.append(time.process_time() - c0)
    probe.sample()
    peak = probe.gflops
    step_s, old_s = statistics.median(step_times), statistics.median(old_times)
    print(
        f"float32 {args.matmul_size}^3 matmul: {peak:.0f} GFLOP/s (median of {len(probe.rates)}, "
        "sampled between steps: "
        f"{[round(r) for r in probe.rates]})"
    )
    # policy fwd + bwd (LoRA: no weight gradients of the base), reference fwd; adapters not counted
    flops_step = ((4 if lora.enabled else 6) + 2) * n_params * tokens
    flops_old = 2 * n_params * tokens
    gf = flops_step / step_s / 1e9
    gf_all = (flops_step + flops_old) / (step_s + old_s) / 1e9
    print(
        f"update (ref log-probs inside, old log-probs given): {step_s:.2f} s median of "
        f"{[round(t, 2) for t in step_times]}; "
        f"{gf:.0f} GFLOP/s nominal = {gf / peak:.0%} of matmul peak; CPU time {statistics.median(step_cpu):.1f} s "
        f"({os.cpu_count()} cores)"
    )
    print(
        f"old log-probs recompute: {old_s:.2f} s median of {[round(t, 2) for t in old_times]}; "
        f"update with old log-probs: {step_s + old_s:.2f} s, {gf_all:.0f} GFLOP/s = {gf_all / peak:.0%} of peak"
    )
    print(f"peak RSS {peak_rss_gb():.2f} GB; load avg {load_avg()}")


if __name__ == "__main__":
    main()
