"""Where a GRPO update's time goes, one decoder layer at a time: forward + backward of the layer's
attention and of its MLP, ours (the model's own `attention` and `attention_out_and_mlp`, jitted)
against PyTorch (`scaled_dot_product_attention`, causal, and the same SwiGLU in torch ops), in one
process, at W2's model (SmolLM2-135M's layer shapes, float32) and a W2-like micro-batch.

    python benchmarks/layer_profile.py [--rows 2] [--tokens 1040] [--reps 3] [--impl dense]

Prints seconds per layer (best of `--reps`) for each part and each library, and the ratio; times
30 layers (SmolLM2's depth) are what one forward + backward of the micro-batch spends there.
The reference forward and the log-probs are not in it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from w1 import load_avg  # noqa: E402

from tooln1_jax.models import ModelConfig, init_params  # noqa: E402
from tooln1_jax.models.attention import attention  # noqa: E402
from tooln1_jax.models.transformer import attention_out_and_mlp  # noqa: E402

# SmolLM2-135M's layer (benchmarks/W2.md): hidden 576, 9 query / 3 KV heads of 64, MLP 1536.
SMOLLM2_LAYER = ModelConfig(
    vocab_size=64, hidden_size=576, intermediate_size=1536, num_layers=1, num_heads=9, num_kv_heads=3, head_dim=64
)


def best_seconds(run, reps: int) -> float:
    run()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def ours(config: ModelConfig, rows: int, tokens: int, impl: str, reps: int) -> dict[str, float]:
    c, rng = config, np.random.default_rng(0)
    lp = jax.tree.map(lambda a: a[0], init_params(c, jax.random.key(0))["layers"])
    x = jnp.asarray(rng.normal(size=(rows, tokens, c.hidden_size)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(rows, tokens, c.num_heads, c.head_dim)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(rows, tokens, c.num_kv_heads, c.head_dim)), jnp.float32)
    valid = jnp.ones((rows, tokens), jnp.int32)
    attn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(impl, q, k, v, valid) ** 2), argnums=(0, 1, 2)))
    zero_attn = jnp.zeros((rows, tokens, c.num_heads * c.head_dim), jnp.float32)
    mlp = jax.jit(jax.grad(lambda lp, x: jnp.sum(attention_out_and_mlp(c, lp, x, zero_attn) ** 2), argnums=(0, 1)))
    return {
        "attention": best_seconds(lambda: jax.block_until_ready(attn(q, kv, kv)), reps),
        "o_proj + MLP": best_seconds(lambda: jax.block_until_ready(mlp(lp, x)), reps),
    }


def theirs(config: ModelConfig, rows: int, tokens: int, reps: int) -> dict[str, float]:
    c, g = config, torch.Generator().manual_seed(0)
    randn = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).requires_grad_()
    q = randn(rows, c.num_heads, tokens, c.head_dim)
    k, v = randn(rows, c.num_kv_heads, tokens, c.head_dim), randn(rows, c.num_kv_heads, tokens, c.head_dim)
    x = randn(rows, tokens, c.hidden_size)
    o, gate, up = (
        randn(c.hidden_size, c.num_heads * c.head_dim),
        randn(c.intermediate_size, c.hidden_size),
        randn(c.intermediate_size, c.hidden_size),
    )
    down, attn_out = randn(c.hidden_size, c.intermediate_size), torch.zeros(rows, tokens, c.num_heads * c.head_dim)
    norm = torch.nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
    f = torch.nn.functional

    def attn_step():
        out = f.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.autograd.grad((out**2).sum(), (q, k, v))

    def mlp_step():
        h = x + f.linear(attn_out, o)
        n = norm(h)
        out = h + f.linear(f.silu(f.linear(n, gate)) * f.linear(n, up), down)
        torch.autograd.grad((out**2).sum(), (x, o, gate, up, down))

    return {"attention": best_seconds(attn_step, reps), "o_proj + MLP": best_seconds(mlp_step, reps)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1040)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--impl", default="dense", help="our model.attention_impl (dense, blockwise, ...)")
    args = parser.parse_args()
    print(f"one layer, forward + backward, [{args.rows}, {args.tokens}] tokens; load avg {load_avg()}", flush=True)
    a = ours(SMOLLM2_LAYER, args.rows, args.tokens, args.impl, args.reps)
    b = theirs(SMOLLM2_LAYER, args.rows, args.tokens, args.reps)
    for part in a:
        print(
            f"{part:14s} ours ({args.impl}) {a[part]:.3f} s, PyTorch {b[part]:.3f} s: {b[part] / a[part]:.2f}x "
            f"PyTorch's speed; x30 layers {30 * a[part]:.1f} s against {30 * b[part]:.1f} s"
        )
    print(f"load avg {load_avg()}")


if __name__ == "__main__":
    main()
