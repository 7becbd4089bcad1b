"""Greedy completions of evaluation prompts through the project's sampler.

`load_model` reads an HF folder (`load_pretrained`) or a training run's orbax checkpoint
(`checkpoint.restore_policy`) onto a device mesh. `generate_completions` decodes greedily
through the same path as training's held-out accuracy (`rollouts.greedy_completions`), with
the evaluation prompt; with several processes each one gets every completion.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from tooln1_jax.checkpoint import restore_policy
from tooln1_jax.data.records import DropCounts, ToolRecord
from tooln1_jax.models import load_pretrained
from tooln1_jax.rollouts import greedy_completions


def is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load_model(path: str, *, step: int | None = None, mesh=None):
    """(config, params) from an HF folder, or else from an orbax checkpoint, placed on `mesh`."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint {path}: no such folder")
    if is_hf_folder(path):
        return load_pretrained(path, mesh=mesh)
    return restore_policy(path, step=step, mesh=mesh)


def generate_completions(
    config, params, tokenizer: Any, records: Sequence[ToolRecord], **decode
) -> tuple[dict[str, str], DropCounts]:
    """{record id: completion text} for every record whose prompt fits, and the drops (scored
    wrong as prompt_too_long by the caller): `rollouts.greedy_completions` with the evaluation
    prompt and its keyword arguments `decode` (batch_size, max_new_tokens, max_prompt_length,
    mesh, progress)."""
    kept, completions, _, drops = greedy_completions(config, params, tokenizer, records, for_eval=True, **decode)
    return {r.id: text for r, text in zip(kept, completions)}, drops
