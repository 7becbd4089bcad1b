"""Tool-N1-14B: the 7B recipe (same hyperparameters, as in the paper) on Qwen2.5-14B-Instruct.

python -m tooln1_jax.train --config configs/tool_n1_qwen2_5_14b.py
"""

import importlib.util
import os

from tooln1_jax.config import validate_config


def _paper_config(model: str):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tool_n1_qwen2_5_7b.py")
    spec = importlib.util.spec_from_file_location("tool_n1_qwen2_5_7b", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.paper_config(model)


def get_config():
    c = _paper_config("Qwen/Qwen2.5-14B-Instruct")
    # 14B: 2-way tensor parallelism (40 query / 8 KV heads split evenly) halves per-chip
    # activations; FSDP over the remaining devices.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 2
    c.rl.micro_batch_size = 16
    c.rollout.prompts_per_call = 32  # the 14B KV cache is 3.4x the 7B's per token
    return validate_config(c)
