"""Rollout speed on workload W1 (../shared/benchmarks/W1.md): 8 prompts x 8 samples, 128-token
prompts, exactly 128 new tokens, temperature 0.7, random Qwen2 (27M params, float32).

    python benchmarks/rollout.py [--compare-hf] [--floor] [--reps 3] [--threads 1] [--devices 2]

Prints generated tokens/s (median of --reps timed runs after a compile run), compile seconds
and peak resident memory. With --compare-hf, transformers' `generate` runs on the same weights
and prompts in the same process (sampling, temperature 0.7, top_p 1, top_k 0, exactly 128 new
tokens), its repetitions interleaved with ours so both see the same machine load, and the
ratios of wall time and of process CPU time are printed. On a shared machine compare ratios,
not absolutes. `--threads 1` runs the whole process on one core (its CPU affinity, set before
JAX starts: XLA sizes its thread pool from it, and no XLA flag does) and torch on one thread: a
single-core comparison, fair when other processes contend for the cores.

`--devices N` gives XLA N CPU devices and splits the rows over them (a data-parallel mesh,
`SAMPLE_RULES`), so the decode's attention, whose batched products XLA:CPU runs on one thread,
proceeds on each core at once; transformers is unchanged.

--floor also times, in the same process, the rollout's weight matmuls alone (the prefill's
and 127 decode steps' q/k/v, o, gate/up, down and LM-head products, float32, with nothing
between them), on one device: no one-device sampler can beat that time here, so it bounds
the reachable tokens/s (with --devices it is a reference, not a strict bound).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare-hf", action="store_true", help="also time transformers generate, same process")
    parser.add_argument("--floor", action="store_true", help="also time the weight matmuls alone (a lower bound)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions after compile (median reported)")
    parser.add_argument(
        "--threads", type=int, choices=[1], default=None, help="1: the process on one core, torch on one thread"
    )
    parser.add_argument("--devices", type=int, default=1, help="XLA CPU devices to split our rows over (data parallel)")
    args = parser.parse_args()
    if args.devices < 1:
        parser.error(f"--devices {args.devices}: must be at least 1")
    return args


# Parsed before JAX starts: --threads and --devices act through the CPU affinity and XLA_FLAGS,
# which XLA reads once, when it starts.
ARGS = parse_args() if __name__ == "__main__" else None
if ARGS and ARGS.threads == 1:  # one core for the whole process, before XLA reads the core count
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
if ARGS and ARGS.devices > 1:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
    ).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from w1 import GROUP, NEW_TOKENS, PROMPT_LEN, PROMPTS, TEMPERATURE, W1, load_avg, peak_rss_gb  # noqa: E402

from tooln1_jax.models import init_params, save_pretrained  # noqa: E402
from tooln1_jax.sampling import sample  # noqa: E402
from tooln1_jax.sharding import make_mesh  # noqa: E402


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def jax_rollout(params, prompts, devices: int = 1):
    mesh = make_mesh(data=devices, fsdp=1) if devices > 1 else None

    def once(seed=0):
        result = sample(
            W1,
            params,
            prompts,
            num_samples=GROUP,
            max_new_tokens=NEW_TOKENS,
            temperature=TEMPERATURE,
            stop_token_ids=[],
            rng=jax.random.PRNGKey(seed),
            mesh=mesh,
        )
        jax.block_until_ready(result.tokens)
        assert int(result.num_steps) == NEW_TOKENS and bool(result.mask.all()), (
            "W1 needs exactly 128 new tokens per row"
        )

    return once


def hf_rollout(params, prompts):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(W1, params, folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    input_ids = torch.tensor(prompts, dtype=torch.long)

    def once():
        with torch.no_grad():
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                temperature=TEMPERATURE,
                top_p=1.0,
                top_k=0,
                min_new_tokens=NEW_TOKENS,
                max_new_tokens=NEW_TOKENS,
                num_return_sequences=GROUP,
                pad_token_id=0,
            )
        assert out.shape == (PROMPTS * GROUP, PROMPT_LEN + NEW_TOKENS), out.shape

    return once


def matmul_floor(params):
    """Times the rollout's weight matmuls alone: prefill (B*P rows, LM head on the last
    position only) plus NEW_TOKENS - 1 decode steps of PROMPTS * GROUP rows."""
    import jax.numpy as jnp

    from tooln1_jax.models.group_decode import decode_weights

    weights = decode_weights(W1, params)  # the sampler's own layout: [out, in], activations [D, rows]

    @jax.jit
    def matmuls(x_t, weights):
        for lp in weights.layers:  # each product feeds the next, as in the model
            qkv = lp["qkv"] @ x_t
            x_t = x_t + lp["o_proj"] @ qkv[: x_t.shape[0]]
            x_t = x_t + lp["down_proj"] @ (lp["gate_up"] @ x_t)[: W1.intermediate_size]
        return weights.head @ (x_t[:, -PROMPTS:] if x_t.shape[1] > PROMPTS * GROUP else x_t)

    def once(rows):
        x_t = jnp.ones((W1.hidden_size, rows), jnp.float32) * 0.01
        jax.block_until_ready(matmuls(x_t, weights))
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(matmuls(x_t, weights))
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    return once(PROMPTS * PROMPT_LEN) + (NEW_TOKENS - 1) * once(PROMPTS * GROUP)


def summary(name: str, runs: list[tuple[float, float]]) -> tuple[float, float]:
    wall = statistics.median(w for w, _ in runs)
    cpu = statistics.median(c for _, c in runs)
    tokens = PROMPTS * GROUP * NEW_TOKENS
    print(
        f"{name}: {tokens / wall:.0f} tok/s (median wall {wall:.2f} s of {[round(w, 2) for w, _ in runs]}; "
        f"{tokens / cpu:.0f} tok per CPU-second, median CPU {cpu:.2f} s)"
    )
    return wall, cpu


def main(args: argparse.Namespace):
    params = init_params(W1, jax.random.PRNGKey(0))
    prompts = np.random.default_rng(0).integers(0, W1.vocab_size, (PROMPTS, PROMPT_LEN)).tolist()
    print(
        f"W1 rollout: {PROMPTS} prompts x {GROUP} samples, {PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens, "
        f"T={TEMPERATURE}; {len(jax.devices())} {jax.devices()[0].platform} device(s), threads "
        f"{args.threads or 'default'} (cores usable: {len(os.sched_getaffinity(0))}), load avg {load_avg()}"
    )
    if args.devices > 1 and len(jax.devices()) != args.devices:
        raise SystemExit(
            f"--devices {args.devices}: XLA has {len(jax.devices())} device(s); is XLA_FLAGS overriding it?"
        )
    ours = jax_rollout(params, prompts, args.devices)
    first, _ = timed(ours)  # compile + one run
    jax_peak = peak_rss_gb()
    hf = None
    if args.compare_hf:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        hf = hf_rollout(params, prompts)
        timed(hf)  # warm-up
    ours_runs, hf_runs = [], []
    for _ in range(args.reps):  # interleaved, so both see the same load
        ours_runs.append(timed(ours))
        if hf:
            hf_runs.append(timed(hf))
    wall, cpu = summary("tooln1_jax.sampling", ours_runs)
    print(
        f"compile {first - wall:.1f} s; peak RSS {jax_peak:.2f} GB after our compile and first run"
        + (f", {peak_rss_gb():.2f} GB with transformers too" if hf else "")
    )
    if hf:
        hf_wall, hf_cpu = summary("transformers generate", hf_runs)
        print(
            f"ratio: {hf_wall / wall:.2f}x transformers by wall time, {hf_cpu / cpu:.2f}x by CPU time; "
            f"load avg {load_avg()}"
        )
    if args.floor:
        floor = matmul_floor(params)
        tokens = PROMPTS * GROUP * NEW_TOKENS
        print(
            f"matmul floor: the weight matmuls alone take {floor:.2f} s = {tokens / floor:.0f} tok/s at most; "
            f"the sampler reaches {floor / wall:.0%} of it"
            + (f"; the floor is {hf_wall / floor:.2f}x transformers" if hf else "")
        )


if __name__ == "__main__":
    main(ARGS)
