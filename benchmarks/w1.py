"""Workload W1 (../shared/benchmarks/W1.md), shared by the rollout and GRPO-step benchmarks."""

import os
import resource

from tooln1_jax.models import ModelConfig

# Qwen2 architecture, random weights (seed 0), float32, about 27M parameters.
W1 = ModelConfig(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,
    num_layers=8,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    attention_bias=True,
    max_position_embeddings=1024,
    model_type="qwen2",
)
PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS, TEMPERATURE = 8, 8, 128, 128, 0.7


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())
