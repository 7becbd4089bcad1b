"""Rollout speed on workload W1 (../shared/benchmarks/W1.md): 8 prompts x 8 samples, 128-token
prompts, exactly 128 new tokens, temperature 0.7, random Qwen2 (27M params, float32).

    python benchmarks/rollout.py [--compare-hf] [--reps 3]

Prints generated tokens/s (median of --reps timed runs after a compile run), compile seconds
and peak resident memory. With --compare-hf, transformers' `generate` runs on the same weights
and prompts in the same process (sampling, temperature 0.7, top_p 1, top_k 0, exactly 128 new
tokens) and the ratio is printed. The machine may be shared: compare ratios, not absolutes.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tooln1_jax.models import ModelConfig, init_params, save_pretrained  # noqa: E402
from tooln1_jax.sampling import sample  # noqa: E402

W1 = ModelConfig(
    vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=2,
    head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True,
    max_position_embeddings=1024, model_type="qwen2",
)
PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS, TEMPERATURE = 8, 8, 128, 128, 0.7


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_jax(params, prompts, reps: int) -> dict:
    def once(seed):
        t0 = time.perf_counter()
        result = sample(W1, params, prompts, num_samples=GROUP, max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE,
                        stop_token_ids=[], rng=jax.random.PRNGKey(seed))
        jax.block_until_ready(result.tokens)
        seconds = time.perf_counter() - t0
        assert int(result.num_steps) == NEW_TOKENS and bool(result.mask.all()), "W1 needs exactly 128 new tokens per row"
        return seconds

    first = once(0)  # compile + one run
    times = [once(seed) for seed in range(1, reps + 1)]
    run = statistics.median(times)
    return {"tok_s": PROMPTS * GROUP * NEW_TOKENS / run, "seconds": run, "compile_s": first - run, "times": times}


def run_hf(params, prompts, reps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(W1, params, folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    input_ids = torch.tensor(prompts, dtype=torch.long)

    def once():
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, temperature=TEMPERATURE,
                top_p=1.0, top_k=0, min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS,
                num_return_sequences=GROUP, pad_token_id=0,
            )
        assert out.shape == (PROMPTS * GROUP, PROMPT_LEN + NEW_TOKENS), out.shape
        return time.perf_counter() - t0

    once()  # warm-up
    times = [once() for _ in range(reps)]
    run = statistics.median(times)
    return {"tok_s": PROMPTS * GROUP * NEW_TOKENS / run, "seconds": run, "times": times}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare-hf", action="store_true", help="also time transformers generate, same process")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions after compile (median reported)")
    args = parser.parse_args()

    params = init_params(W1, jax.random.PRNGKey(0))
    prompts = np.random.default_rng(0).integers(0, W1.vocab_size, (PROMPTS, PROMPT_LEN)).tolist()
    print(f"W1 rollout: {PROMPTS} prompts x {GROUP} samples, {PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens, "
          f"T={TEMPERATURE}; {len(jax.devices())} {jax.devices()[0].platform} device(s), load avg {load_avg()}")
    ours = run_jax(params, prompts, args.reps)
    print(f"tooln1_jax.sampling: {ours['tok_s']:.0f} tok/s (median {ours['seconds']:.2f} s of "
          f"{[round(t, 2) for t in ours['times']]}), compile {ours['compile_s']:.1f} s, peak RSS {peak_rss_gb():.2f} GB")
    if args.compare_hf:
        hf = run_hf(params, prompts, args.reps)
        print(f"transformers generate: {hf['tok_s']:.0f} tok/s (median {hf['seconds']:.2f} s of "
              f"{[round(t, 2) for t in hf['times']]}), peak RSS (both) {peak_rss_gb():.2f} GB")
        print(f"ratio: {ours['tok_s'] / hf['tok_s']:.2f}x transformers; load avg {load_avg()}")


if __name__ == "__main__":
    main()
