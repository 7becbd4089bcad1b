"""The one optimizer factory: global-norm clipping, then AdamW after an optional linear warmup.

GRPO (`train_step`) and SFT (`sft`) both build their optimizer here from an `OptimizerSettings`,
so the two differ only in the settings they pass, and the learning rate a log reports is the
schedule optax applied, not a second computation of it.
"""

from __future__ import annotations

import dataclasses

import optax


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


def make_optimizer(settings: OptimizerSettings) -> optax.GradientTransformation:
    """Clipping (when `grad_clip` > 0), then AdamW on `settings.schedule()`."""
    s = settings
    adamw = optax.adamw(s.schedule(), b1=s.b1, b2=s.b2, eps=s.eps, weight_decay=s.weight_decay)
    return optax.chain(optax.clip_by_global_norm(s.grad_clip), adamw) if s.grad_clip else adamw
