"""The settings the run config is made of, as frozen, hashable dataclasses and the allowed values
of its choice fields: one place for each default and each vocabulary. The config (`config.py`)
copies its defaults from here and validates against these tuples; the modules that use a
setting (`grpo`, `optimizer`, `rewards`, `models`) import it from here. Nothing here imports the
rest of the package, so every module can.
"""

from __future__ import annotations

import dataclasses

import optax

REWARD_VARIANTS = ("binary", "no_reason", "partial_reason", "partial_reason_funcname")
MODEL_TYPES = ("qwen2", "llama")
REMAT_POLICIES = ("none", "full", "dots")
# models/attention.py; "auto" picks by backend, dtype and length (`attention.resolve`).
ATTENTION_IMPLS = ("auto", "dense", "blockwise", "cudnn", "splash")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
# LoRA targets by name: the attention projections q, k, v, o and the MLP's gate, up, down.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The GRPO loss's settings, with their defaults (the config's defaults come from here).

    clip_eps: PPO ratio clip; kl_coef: weight of the KL to the frozen reference (0 = no
    reference at all); kl_estimator: one of `KL_ESTIMATORS`; entropy_coef: entropy bonus;
    aggregation: one of `AGGREGATIONS` (see `grpo_loss`); norm_constant: Dr. GRPO's constant
    (None = the sequence width T). Frozen and hashable, so a jitted step can be cached on it."""

    clip_eps: float = 0.2
    kl_coef: float = 1e-3
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    aggregation: str = "token_mean"
    norm_constant: float | None = None

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r}: expected one of {AGGREGATIONS}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r}: expected one of {KL_ESTIMATORS}")


DEFAULT_LOSS = LossSettings()


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """AdamW settings (hashable, so a jitted step can be cached on them). `grad_clip` 0 = no clipping;
    `warmup_steps` 0 = the constant rate `lr` from the first update."""

    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0
    eps: float = 1e-8

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"the learning_rate (lr) must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def schedule(self) -> optax.ScalarOrSchedule:
        """The learning rate: a function of the update count (0 for the first update) with a
        warmup, else the constant (optax then keeps no step counter for it)."""
        return optax.warmup_constant_schedule(0.0, self.lr, self.warmup_steps) if self.warmup_steps else self.lr

    def applied_lr(self, num_updates: int) -> float:
        """The rate the `num_updates`-th update used (1-based); 0 before any update."""
        rate = self.schedule()
        return 0.0 if num_updates <= 0 else float(rate(num_updates - 1) if callable(rate) else rate)


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapters on a frozen base (`models/lora.py`); the config's `lora` section.

    rank: the adapters' rank r (0 = off: full fine-tuning); alpha: the update is
    (alpha / rank) * A @ B; dropout: only 0 is implemented; targets: which projections carry an
    adapter, names from `LORA_TARGETS` (each layer's `<name>_proj`); train_norms: train every
    RMSNorm weight whole beside the adapters (PEFT's `modules_to_save`), which a random base needs.
    Frozen and hashable, so a jitted step can be cached on it."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    train_norms: bool = False

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora rank={self.rank} must be >= 0 (0 turns LoRA off)")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora targets={self.targets!r}: expected distinct names from {LORA_TARGETS}")
        if self.dropout != 0.0:
            raise ValueError(f"lora dropout={self.dropout}: only 0 is implemented")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """alpha / rank: the factor on A @ B (PEFT's `scaling`)."""
        return self.alpha / self.rank

    @property
    def target_leaves(self) -> tuple[str, ...]:
        """The adapted parameters' names in `params.PARAM_SPECS` ("q" -> "q_proj"), in LORA_TARGETS order."""
        return tuple(f"{t}_proj" for t in LORA_TARGETS if t in self.targets)


LORA_OFF = LoraSettings()  # rank 0: full fine-tuning
