"""Decode compile time against depth (issue 16), and the decode step's steady-state CPU cost at W1.

    python benchmarks/decode_compile.py [--depths 8 16 30 48] [--unroll auto|full|N] [--reps 2] [--no-w1]

For random float32 Qwen2 models of one small width (hidden 256, 4 heads / 2 kv heads, head_dim
64, intermediate 512, vocabulary 1024) at each depth, times `jax.jit(...).lower(...).compile()`
of the sampler's decode program, `sampling._decode` (its four decode-loop bodies included; 4
prompts x 4 samples, 32-token prompts, 64 new tokens), lowered on the prefill's output shapes.
Then, at W1's shape (benchmarks/w1.py: 8 prompts x 8 samples, 128-token prompts, 128 new tokens,
no stop token), runs the compiled decode program --reps times after one warm-up run and prints
its CPU milliseconds per generated token (median). Both in process CPU seconds
(`time.process_time`, every thread): on a shared, loaded machine CPU time is steadier than wall
time. The persistent compilation cache is off, so every program is compiled.

--unroll sets `lax.scan`'s unroll for the decode step's layer scan: auto (the sampler's own
choice, `group_decode.layer_unroll`), full (every layer, a straight-line step), or a number of
layers per iteration (1: one layer body, compiled once at any depth).
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
from w1 import GROUP, NEW_TOKENS, PROMPT_LEN, PROMPTS, TEMPERATURE, W1, load_avg  # noqa: E402

from tooln1_jax import sampling  # noqa: E402
from tooln1_jax.models import ModelConfig, group_decode, init_params  # noqa: E402
from tooln1_jax.token_draw import SamplingFilters  # noqa: E402


def small_config(depth: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_layers=depth,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
    )


SCALARS = (jnp.float32(TEMPERATURE), jnp.float32(1.0), jnp.asarray([-1], jnp.int32))  # T, top_p, no stop token


def programs(config: ModelConfig, prompts: int, group: int, new_tokens: int, with_prefill: bool):
    """(params, prefill args, compiled prefill or None, compiled decode, decode compile CPU s)."""
    params = init_params(config, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (prompts, PROMPT_LEN), 1, config.vocab_size).astype(jnp.int32)
    plan = sampling.DecodePlan(group, new_tokens, SamplingFilters(greedy=False, top_k=0, use_top_p=False), 0)
    prefill_args = (params, tokens, jnp.ones_like(tokens), jax.random.PRNGKey(2), *SCALARS)
    state = jax.eval_shape(lambda *a: sampling._prefill(config, *a, plan=plan), *prefill_args)
    start = time.process_time()
    decode = sampling._decode.lower(
        config, params, state, *SCALARS, plan=plan, decode_segments=sampling.DECODE_SEGMENTS
    ).compile()
    decode_s = time.process_time() - start
    prefill = sampling._prefill.lower(config, *prefill_args, plan=plan).compile() if with_prefill else None
    return params, prefill_args, prefill, decode, decode_s


def w1_cpu_ms_per_token(reps: int) -> tuple[float, float, list[float]]:
    """(W1 decode compile CPU s, median decode CPU ms per generated token, every timed run's)."""
    params, prefill_args, prefill, decode, decode_s = programs(W1, PROMPTS, GROUP, NEW_TOKENS, with_prefill=True)
    runs = []
    for rep in range(reps + 1):  # the first run warms caches and the thread pool
        state = jax.block_until_ready(prefill(*prefill_args))
        start = time.process_time()
        out = jax.block_until_ready(decode(params, state, *SCALARS))
        cpu = time.process_time() - start
        assert int(out.step) == NEW_TOKENS, int(out.step)
        if rep:
            runs.append(cpu * 1e3 / (PROMPTS * GROUP * (NEW_TOKENS - 1)))  # the prefill made token 1
    return decode_s, statistics.median(runs), runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="*", default=[8, 16, 30, 48])
    parser.add_argument("--unroll", default="auto", help="auto, full, or layers per scan iteration")
    parser.add_argument("--reps", type=int, default=2, help="timed W1 decode runs (median reported)")
    parser.add_argument("--no-w1", action="store_true", help="skip the W1 steady-state runs")
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)  # compile, never load
    if args.unroll != "auto":
        fixed = None if args.unroll == "full" else int(args.unroll)
        group_decode.layer_unroll = lambda num_layers: fixed or num_layers
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, --unroll {args.unroll}, load {load_avg()}")
    print("| layers | decode compile, CPU s |\n|---|---|")
    for depth in args.depths:
        *_, decode_s = programs(small_config(depth), 4, 4, 64, with_prefill=False)
        print(f"| {depth} | {decode_s:.2f} |", flush=True)
    if not args.no_w1:
        decode_s, median_ms, runs = w1_cpu_ms_per_token(args.reps)
        print(
            f"W1: decode compile {decode_s:.2f} CPU s; steady state {median_ms:.3f} CPU ms per generated token "
            f"(median of {[round(r, 3) for r in runs]}); load {load_avg()}"
        )


if __name__ == "__main__":
    main()
