"""Model hyperparameters, read from a Hugging Face config.json, plus named Qwen2.5 presets."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from tooln1_jax.settings import ATTENTION_IMPLS, MODEL_TYPES, REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder hyperparameters. Frozen and hashable, so it can be a static jit argument.

    `dtype` is the compute dtype (activations, matmuls); parameters keep their own dtype.
    `remat` is one of "none", "full" (recompute each layer in the backward pass) or
    "dots" (save matmul outputs only). `attention_impl` is one of `ATTENTION_IMPLS`
    (models/attention.py; "auto" picks the best for the backend).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02  # stddev of a random init's weights (transformers' name)
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # q/k/v bias: True for Qwen2, False for Llama
    mlp_bias: bool = False
    max_position_embeddings: int = 32768
    model_type: str = "qwen2"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not supported; expected one of {MODEL_TYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.mlp_bias:
            raise ValueError("mlp_bias=True is not supported (no Qwen2.5 or Llama-3 checkpoint uses it)")
        if self.model_type == "llama" and self.attention_bias:
            raise ValueError("Llama with attention_bias=True (o_proj bias) is not supported")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLS}")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = d * (q + 2 * kv) + q * d + (q + 2 * kv if self.attention_bias else 0)
        layer = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + d

    @classmethod
    def from_hf(cls, hf: Any, **overrides) -> ModelConfig:
        """From a transformers config object, a config.json dict, or a path to config.json / its folder."""
        if isinstance(hf, (str, os.PathLike)):
            path = os.path.join(hf, "config.json") if os.path.isdir(hf) else hf
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        if not isinstance(hf, dict):
            hf = hf.to_dict()
        model_type = hf.get("model_type", "qwen2")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config.json model_type={model_type!r} is not supported; expected one of {MODEL_TYPES}")
        rope_scaling = hf.get("rope_scaling") or {}
        rope_kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_kind not in ("default", None):
            raise ValueError(f"config.json rope_scaling type {rope_kind!r} is not supported (only plain RoPE)")
        if hf.get("use_sliding_window", False):
            raise ValueError("config.json use_sliding_window=true is not supported")
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:  # transformers 5 moved it into rope_parameters
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(rope_theta),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            initializer_range=hf.get("initializer_range", 0.02),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict:
        """A config.json dict that transformers reads as Qwen2ForCausalLM / LlamaForCausalLM."""
        arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[self.model_type]
        out = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            eos = self.eos_token_id
            out["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
        return out


def _qwen25(hidden, inter, layers, heads, kv, tied, vocab=151936) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hidden // heads,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        attention_bias=True,
        max_position_embeddings=32768,
        model_type="qwen2",
        bos_token_id=151643,
        eos_token_id=151645,
        dtype="bfloat16",
    )


# Published config.json values of the Qwen2.5-*-Instruct checkpoints.
PRESETS: dict[str, ModelConfig] = {
    "Qwen/Qwen2.5-0.5B-Instruct": _qwen25(896, 4864, 24, 14, 2, True),
    "Qwen/Qwen2.5-1.5B-Instruct": _qwen25(1536, 8960, 28, 12, 2, True),
    "Qwen/Qwen2.5-3B-Instruct": _qwen25(2048, 11008, 36, 16, 2, True),
    "Qwen/Qwen2.5-7B-Instruct": _qwen25(3584, 18944, 28, 28, 4, False, vocab=152064),
    "Qwen/Qwen2.5-14B-Instruct": _qwen25(5120, 13824, 48, 40, 8, False, vocab=152064),
    "Qwen/Qwen2.5-32B-Instruct": _qwen25(5120, 27648, 64, 40, 8, False, vocab=152064),
    "Qwen/Qwen2.5-72B-Instruct": _qwen25(8192, 29568, 80, 64, 8, False, vocab=152064),
}


def preset(name: str) -> ModelConfig:
    """A preset by hub id ("Qwen/Qwen2.5-7B-Instruct") or short name ("qwen2.5-7b-instruct")."""
    for key, cfg in PRESETS.items():
        if name in (key, key.split("/")[1], key.split("/")[1].lower()):
            return cfg
    raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
