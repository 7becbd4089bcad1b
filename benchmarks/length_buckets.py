"""Cost follows real lengths: the trainer's W1 GRPO update (`grpo_step.benchmark_step` with
`bucketed=True`: `bucketed_update.update_on_real_lengths`, each micro-batch cut to the length
buckets of its own rows) on a batch whose longest completion is 40 tokens, padded to
max_new_tokens = 256, against the same batch at max_new_tokens = 64, and against the one-width
step (`make_grpo_step`) on the uncut 256-column batch (the cost before buckets).

    python benchmarks/length_buckets.py [--rows 64] [--reps 3] [--micro-batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from grpo_step import PROMPT_LEN, benchmark_step  # noqa: E402
from w1 import W1, load_avg  # noqa: E402

from tooln1_jax.bucketed_update import update_on_real_lengths  # noqa: E402
from tooln1_jax.models import init_params  # noqa: E402

LONGEST = 40


def batch_of(rows: int, width: int, seed: int = 0) -> dict:
    """[rows, PROMPT_LEN + width] with completions of 1..LONGEST tokens (one of LONGEST)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, LONGEST + 1, rows)
    lengths[0] = LONGEST
    done = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(0, W1.vocab_size, (rows, PROMPT_LEN + width)).astype(np.int32)
    attn = np.concatenate([np.ones((rows, PROMPT_LEN), np.int32), done], 1)
    loss = np.concatenate([np.zeros((rows, PROMPT_LEN), np.float32), done.astype(np.float32)], 1)
    adv = rng.normal(size=rows).astype(np.float32)
    return dict(input_ids=ids * attn, attention_mask=attn, loss_mask=loss, advantages=adv, old_logprobs=-loss * 5)


def time_update(params, rows: int, width: int, micro: int, reps: int, bucketed: bool) -> float:
    """Median seconds of `reps` updates after a first (compiling) one."""
    state, ref, step, _ = benchmark_step(
        W1, params, 0, ref_dtype=None, micro_batch_size=micro, chunk_size=128, completion_len=width, bucketed=bucketed
    )
    batch = batch_of(rows, width)
    run = (
        (lambda s: update_on_real_lengths(step, s, ref, batch, PROMPT_LEN))
        if bucketed
        else (lambda s: step(s, ref, batch))
    )
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        state, m = run(state)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    args = parser.parse_args()
    params = init_params(W1, jax.random.key(0))
    print(f"W1 update, {args.rows} rows, prompt {PROMPT_LEN}, longest completion {LONGEST}; load avg {load_avg()}")
    cases = [
        ("max_new_tokens=256, trainer", 256, True),
        ("max_new_tokens=64, trainer", 64, True),
        ("max_new_tokens=256, one width", 256, False),
    ]
    secs = [time_update(params, args.rows, w, args.micro_batch_size, args.reps, b) for _, w, b in cases]
    for (name, w, _), s in zip(cases, secs):
        print(f"{name:30s} batch width {PROMPT_LEN + w:4d}: {s:.2f} s median of {args.reps}")
    ratio = secs[0] / secs[1]
    print(f"256 / 64: {ratio:.2f} ({'within' if abs(ratio - 1) <= 0.25 else 'NOT within'} 25%); load {load_avg()}")


if __name__ == "__main__":
    main()
