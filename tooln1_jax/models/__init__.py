"""Qwen2.5 / Llama decoder: config, params, forward, KV cache, HF checkpoints (LoRA adapters: `lora.py`)."""

from tooln1_jax.models.hf_io import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    load_pretrained,
    save_pretrained,
)
from tooln1_jax.models.kv_cache import KVCache, cache_sharding, init_cache
from tooln1_jax.models.model_config import PRESETS, ModelConfig, preset
from tooln1_jax.models.params import (
    PARAM_SPECS,
    ParamSpec,
    abstract_params,
    init_params,
    param_logical_axes,
    param_shapes,
    param_sharding,
    param_specs,
    shard_params,
)
from tooln1_jax.models.transformer import forward_cached, hidden_states, lm_head_weight, logits

__all__ = [
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "KVCache",
    "ModelConfig",
    "PARAM_SPECS",
    "PRESETS",
    "ParamSpec",
    "abstract_params",
    "cache_sharding",
    "forward_cached",
    "hidden_states",
    "init_cache",
    "init_params",
    "lm_head_weight",
    "load_pretrained",
    "logits",
    "param_logical_axes",
    "param_shapes",
    "param_sharding",
    "param_specs",
    "preset",
    "save_pretrained",
    "shard_params",
]
