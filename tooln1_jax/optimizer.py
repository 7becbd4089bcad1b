"""The one optimizer factory: global-norm clipping, then AdamW after an optional linear warmup
(its settings: `settings.OptimizerSettings`).

GRPO (`train_step`) and SFT (`sft`) both build their optimizer here from an `OptimizerSettings`,
so the two differ only in the settings they pass, and the learning rate a log reports is the
schedule optax applied, not a second computation of it.
"""

from __future__ import annotations

import functools

import optax

from tooln1_jax.settings import OptimizerSettings


@functools.lru_cache(maxsize=32)
def make_optimizer(settings: OptimizerSettings) -> optax.GradientTransformation:
    """Clipping (when `grad_clip` > 0), then AdamW on `settings.schedule()`. One object per
    settings (cached): jitted steps take the optimizer as a static argument, so equal settings
    reuse their compiled step (an SFT run after another in one process compiles nothing)."""
    s = settings
    adamw = optax.adamw(s.schedule(), b1=s.b1, b2=s.b2, eps=s.eps, weight_decay=s.weight_decay)
    return optax.chain(optax.clip_by_global_norm(s.grad_clip), adamw) if s.grad_clip else adamw
