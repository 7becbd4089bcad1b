"""Greedy completions of evaluation prompts through the project's sampler.

`load_model` reads an HF folder (`load_pretrained`) or a training run's orbax checkpoint
(`checkpoint.restore_policy`) onto a device mesh. `generate_completions` renders each record
with the eval prompt, drops (and counts) prompts over `max_prompt_length` tokens, sorts by
length so batches pad little, and decodes greedily (`temperature=0`) in batches, the rows of
a batch split over the mesh; with several processes each one gets every completion.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
from tqdm import tqdm

from tooln1_jax.checkpoint import restore_policy
from tooln1_jax.data.prompt import encode_prompts, pad_id_of, stop_token_ids
from tooln1_jax.data.records import DropCounts, ToolRecord
from tooln1_jax.distributed import to_host
from tooln1_jax.models.hf_io import load_pretrained
from tooln1_jax.sampling import sample


def is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load_model(path: str, *, step: int | None = None, mesh=None):
    """(config, params) from an HF folder, or else from an orbax checkpoint, placed on `mesh`."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint {path}: no such folder")
    if is_hf_folder(path):
        return load_pretrained(path, mesh=mesh)
    return restore_policy(path, step=step, mesh=mesh)


def generate_completions(config, params, tokenizer: Any, records: Sequence[ToolRecord], *, batch_size: int,
                         max_new_tokens: int, max_prompt_length: int, mesh=None,
                         progress: bool = True) -> tuple[dict[str, str], DropCounts]:
    """{record id: completion text} for every record whose prompt fits, and the drops."""
    # A prompt that leaves no room for the answer within the model's positions is dropped and
    # counted (scored wrong as prompt_too_long), not an error that ends the whole evaluation.
    max_prompt_length = min(max_prompt_length, config.max_position_embeddings - max_new_tokens)
    ids, kept, drops = encode_prompts(tokenizer, records, max_prompt_length=max_prompt_length, for_eval=True)
    order = sorted(range(len(kept)), key=lambda i: len(ids[i]))
    stops = stop_token_ids(tokenizer, config)
    stop_set = set(stops)
    pad_id = pad_id_of(tokenizer)
    completions: dict[str, str] = {}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generating", disable=not progress):
        result = sample(config, params, [ids[i] for i in batch], num_samples=1, max_new_tokens=max_new_tokens,
                        temperature=0.0, stop_token_ids=stops, rng=jax.random.PRNGKey(0), mesh=mesh,
                        pad_id=int(pad_id))
        tokens, lengths = to_host((result.tokens, result.lengths))
        for row, i in enumerate(batch):
            out = [int(t) for t in tokens[row, : int(lengths[row])]]
            if out and out[-1] in stop_set:
                out = out[:-1]
            # Keep added tokens such as <tool_call> (not special in Qwen, but be explicit).
            completions[kept[i].id] = tokenizer.decode(out, skip_special_tokens=False)
    return completions, drops
