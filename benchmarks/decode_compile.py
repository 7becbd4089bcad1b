"""Compile time of the sampler's programs against depth (issue 16), and the decode step's speed.

    python benchmarks/decode_compile.py [--depths 8 16 30 48] [--reps 3]

For random float32 Qwen2 models of one small width (hidden 256, 4 heads / 2 kv heads, head_dim
64, intermediate 512, vocabulary 1024) at each depth, times `jax.jit(...).lower(...).compile()`
of the sampler's two jitted programs, `sampling._prefill` and `sampling._decode` (its four
decode-loop bodies included), in process CPU seconds: XLA compiles a program on one thread, so
on a shared, loaded machine CPU time is steadier than wall time. Then runs them: the
steady-state decode step is the compiled decode program's wall time over the steps it ran
(median of --reps; 4 prompts x 4 samples, 32-token prompts, 64 new tokens, no stop token, so
every run takes 63 decode steps); on a shared machine compare runs from the same minutes.
Prints a markdown table.
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

from tooln1_jax import sampling  # noqa: E402
from tooln1_jax.models import ModelConfig, init_params  # noqa: E402
from tooln1_jax.token_draw import SamplingFilters  # noqa: E402

PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS = 4, 4, 32, 64


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


def measure(depth: int, reps: int) -> dict:
    """Compile seconds of prefill and decode, and the median decode step in ms, at one depth."""
    config = small_config(depth)
    params = init_params(config, jax.random.PRNGKey(0))
    prompts = jax.random.randint(jax.random.PRNGKey(1), (PROMPTS, PROMPT_LEN), 1, config.vocab_size)
    tokens, mask = prompts.astype(jnp.int32), jnp.ones((PROMPTS, PROMPT_LEN), jnp.int32)
    plan = sampling.DecodePlan(GROUP, NEW_TOKENS, SamplingFilters(greedy=False, top_k=0, use_top_p=False), 0)
    scalars = (jnp.float32(0.7), jnp.float32(1.0), jnp.asarray([-1], jnp.int32))
    prefill_args = (config, params, tokens, mask, jax.random.PRNGKey(2), *scalars)

    start = time.process_time()
    prefill = sampling._prefill.lower(*prefill_args, plan=plan).compile()
    prefill_s = time.process_time() - start
    state = prefill(*prefill_args[1:])
    segments = sampling.DECODE_SEGMENTS
    start = time.process_time()
    decode = sampling._decode.lower(config, params, state, *scalars, plan=plan, decode_segments=segments).compile()
    decode_s = time.process_time() - start

    step_ms = []
    for _ in range(reps + 1):  # the first run warms caches and the thread pool
        state = jax.block_until_ready(prefill(*prefill_args[1:]))
        start = time.perf_counter()
        out = jax.block_until_ready(decode(params, state, *scalars))
        step_ms.append((time.perf_counter() - start) * 1e3 / (int(out.step) - 1))
    return {"prefill_s": prefill_s, "decode_s": decode_s, "step_ms": statistics.median(step_ms[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 30, 48])
    parser.add_argument("--reps", type=int, default=3, help="timed decode runs per depth (median reported)")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| layers | prefill compile, CPU s | decode compile, CPU s | decode step, ms |")
    print("|---|---|---|---|")
    for depth in args.depths:
        r = measure(depth, args.reps)
        print(f"| {depth} | {r['prefill_s']:.2f} | {r['decode_s']:.2f} | {r['step_ms']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
