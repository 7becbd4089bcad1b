"""Rollouts: sample n completions per prompt, decode them, score them with the tool-call reward,
and lay them out as the [rows, prompt + response] arrays the GRPO update consumes. Also the
greedy held-out accuracy used for validation and by the demo."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from tooln1_jax import distributed, sampling
from tooln1_jax import rewards as rewards_lib
from tooln1_jax.data.prompt import encode_prompts, pad_id_of, stop_token_ids
from tooln1_jax.data.records import DropCounts, ToolRecord

# Reward reasons that mean the answer's FORMAT was wrong (not just the call).
FORMAT_FAILURES = ("no_call_block", "bad_json", "bad_item_format", "missing_think")


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    """N = prompts x num_samples rows (row i*n + j is sample j of prompt i); T = P + R, with
    P the left-padded prompt width and R = max_new_tokens (after `cut`, R = its width).

    input_ids [N, T] int32: left-padded prompt, then the completion, right-padded with pad_id.
    attention_mask [N, T] int32: 1 on real prompt and completion tokens (stop token included).
    loss_mask [N, T] float32: 1 on completion tokens only.
    old_logprobs [N, T] float32: the sampler's log p(token at t) under softmax(logits / T); 0 off the loss mask.
    rewards [N] float32 (the configured variant); correct [N] float32 (binary exact-call reward).
    reasons, completions: N strings. lengths [N] int32: completion tokens (stop token included).
    stopped [N] bool: the completion ended with a stop token (False: cut at max_new_tokens).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    old_logprobs: np.ndarray
    rewards: np.ndarray
    correct: np.ndarray
    reasons: list[str]
    completions: list[str]
    lengths: np.ndarray
    stopped: np.ndarray
    prompt_width: int
    num_samples: int

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    def summary(self) -> dict[str, float]:
        """Per-rollout metrics: reward mean, exact-call accuracy, format-failure rate, lengths,
        and how often and how long the completions reason (`rewards.reasoning_stats`)."""
        return {
            **rewards_lib.reasoning_stats(self.completions),
            "reward_mean": float(np.mean(self.rewards)),
            "accuracy": float(np.mean(self.correct)),
            "format_failure_rate": float(np.mean([r in FORMAT_FAILURES for r in self.reasons])),
            "response_length": float(np.mean(self.lengths)),
            "response_length_max": float(np.max(self.lengths)),
            "truncated_frac": float(1.0 - np.mean(self.stopped)),
        }


def left_pad(
    prompt_ids: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token-id lists -> (ids [B, width] int32, mask [B, width] int32), padded on the left; the
    width defaults to the sampler's power-of-two bucket of the longest prompt."""
    longest = max(len(p) for p in prompt_ids)
    width = width or sampling.length_bucket(longest)
    if longest > width:
        i = next(i for i, p in enumerate(prompt_ids) if len(p) > width)
        raise ValueError(f"prompt {i} has {len(prompt_ids[i])} tokens, more than the width {width}")
    return sampling.left_pad(prompt_ids, width, pad_id)


def decode_completions(tokenizer: Any, tokens: np.ndarray, lengths: np.ndarray, stops: Sequence[int]) -> list[str]:
    """Completion texts: each row's tokens up to its length, without a final stop token, special
    tokens kept (the reward looks for `<think>` / `<tool_call>`, which some vocabularies mark special)."""
    stops = set(int(s) for s in stops)
    rows = []
    for row, n in zip(tokens, lengths):
        row = [int(t) for t in row[: int(n)]]
        if row and row[-1] in stops:
            row = row[:-1]
        rows.append(row)
    return tokenizer.batch_decode(rows, skip_special_tokens=False)


def _run_sampler(
    model_config,
    params,
    prompt_ids,
    *,
    num_samples,
    max_new_tokens,
    temperature,
    top_p,
    top_k,
    stops,
    pad_id,
    rng,
    mesh,
    decode_segments=sampling.DECODE_SEGMENTS,
):
    result = sampling.sample(
        model_config,
        params,
        prompt_ids,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop_token_ids=stops,
        pad_id=pad_id,
        rng=rng,
        mesh=mesh,
        decode_segments=decode_segments,
    )
    # Every process gets every row (an all-gather across hosts) and scores them all: the same
    # rewards and advantages everywhere, with no second exchange.
    tokens, logprobs, mask, lengths = distributed.to_host((result.tokens, result.logprobs, result.mask, result.lengths))
    return np.asarray(tokens), np.asarray(logprobs, np.float32), np.asarray(mask), np.asarray(lengths, np.int32)


def generate_and_score(
    model_config,
    params,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    records: Sequence[ToolRecord],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    rng: jax.Array,
    mesh=None,
    reward_variant: str = "binary",
    prompt_width: int | None = None,
    prompts_per_call: int = 0,
    decode_segments: int = sampling.DECODE_SEGMENTS,
) -> RolloutBatch:
    """Samples `num_samples` completions for each of B prompts (token-id lists; `records[i]` holds
    prompt i's ground truth), scores them, and returns the N = B * num_samples row batch.
    `prompt_width` fixes P (default: the power-of-two bucket of the longest prompt).
    `prompts_per_call` > 0 samples that many prompts per sampler call (bounds the KV cache);
    `decode_segments` goes to `sampling.sample`."""
    if len(prompt_ids) != len(records):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(records)} records")
    pad_id = pad_id_of(tokenizer)
    stops = stop_token_ids(tokenizer, model_config)
    per_call = prompts_per_call or len(prompt_ids)
    chunks = []
    for i, start in enumerate(range(0, len(prompt_ids), per_call)):
        # One key per chunk, so a chunk's samples do not depend on how many chunks came before.
        chunk_rng = rng if per_call >= len(prompt_ids) else jax.random.fold_in(rng, i)
        chunks.append(
            _run_sampler(
                model_config,
                params,
                [list(p) for p in prompt_ids[start : start + per_call]],
                num_samples=num_samples,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                stops=stops,
                pad_id=pad_id,
                rng=chunk_rng,
                mesh=mesh,
                decode_segments=decode_segments,
            )
        )
    tokens, logprobs, mask, lengths = (np.concatenate(parts) for parts in zip(*chunks))
    completions = decode_completions(tokenizer, tokens, lengths, stops)
    last = tokens[np.arange(len(tokens)), np.maximum(lengths - 1, 0)]
    stopped = (lengths > 0) & np.isin(last, np.asarray(stops))
    truths = [r.answer for r in records for _ in range(num_samples)]
    reward, reasons = rewards_lib.batch_rewards(completions, truths, reward_variant)
    correct = reward if reward_variant == "binary" else rewards_lib.batch_rewards(completions, truths, "binary")[0]

    p_ids, p_mask = left_pad(prompt_ids, pad_id, prompt_width)
    p_ids, p_mask = np.repeat(p_ids, num_samples, axis=0), np.repeat(p_mask, num_samples, axis=0)
    width = p_ids.shape[1]
    mask = mask.astype(np.int32)
    return RolloutBatch(
        input_ids=np.concatenate([p_ids, np.where(mask == 1, tokens, pad_id).astype(np.int32)], axis=1),
        attention_mask=np.concatenate([p_mask, mask], axis=1),
        loss_mask=np.concatenate([np.zeros_like(p_mask, np.float32), mask.astype(np.float32)], axis=1),
        old_logprobs=np.concatenate([np.zeros(p_mask.shape, np.float32), np.where(mask == 1, logprobs, 0.0)], axis=1),
        rewards=np.asarray(reward, np.float32),
        correct=np.asarray(correct, np.float32),
        reasons=list(reasons),
        completions=list(completions),
        lengths=lengths,
        stopped=stopped,
        prompt_width=width,
        num_samples=num_samples,
    )


def group_coverage(correct: np.ndarray, num_samples: int) -> dict[str, float]:
    """correct [prompts * num_samples] (binary exact-call, row i*n + j = sample j of prompt i) ->
    the share of groups no sample solved (`unsolved_frac`: nothing for GRPO to reinforce), solved
    by some samples only (`mixed_frac`: what GRPO learns from), and solved by all (`solved_frac`)."""
    right = np.asarray(correct, np.float32).reshape(-1, num_samples).sum(axis=1)
    return {
        "unsolved_frac": float(np.mean(right == 0)),
        "mixed_frac": float(np.mean((right > 0) & (right < num_samples))),
        "solved_frac": float(np.mean(right == num_samples)),
    }


def greedy_completions(
    model_config,
    params,
    tokenizer,
    records: Sequence[ToolRecord],
    *,
    max_new_tokens: int,
    max_prompt_length: int,
    batch_size: int,
    mesh=None,
    for_eval: bool = False,
    progress: bool = False,
) -> tuple[list[ToolRecord], list[str], list[int], DropCounts]:
    """The one greedy decode path (held-out accuracy and evaluation): (kept records, their
    completions, their lengths in tokens, drops). A prompt that leaves no room for the answer
    within the model's positions, or is over `max_prompt_length`, is dropped and counted.
    Prompts run shortest first, so batches pad little; the last batch is padded with copies to
    `batch_size` when there are several, so every batch compiles once. `for_eval` renders the
    evaluation prompt (with the empty-call rule)."""
    limit = min(max_prompt_length, model_config.max_position_embeddings - max_new_tokens)
    prompt_ids, kept, drops = encode_prompts(tokenizer, records, max_prompt_length=limit, for_eval=for_eval)
    order = sorted(range(len(kept)), key=lambda i: len(prompt_ids[i]))
    pad_id = pad_id_of(tokenizer)
    stops = stop_token_ids(tokenizer, model_config)
    completions, lengths = [None] * len(kept), [0] * len(kept)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generating", disable=not progress):
        chunk = [prompt_ids[i] for i in batch]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk)) if len(order) > batch_size else chunk
        tokens, _, _, lens = _run_sampler(
            model_config,
            params,
            padded,
            num_samples=1,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            top_p=1.0,
            top_k=0,
            stops=stops,
            pad_id=pad_id,
            rng=jax.random.key(0),
            mesh=mesh,
        )
        texts = decode_completions(tokenizer, tokens[: len(chunk)], lens[: len(chunk)], stops)
        for row, i in enumerate(batch):
            completions[i], lengths[i] = texts[row], int(lens[row])
    return list(kept), completions, lengths, drops


def greedy_accuracy(model_config, params, tokenizer, records: Sequence[ToolRecord], **decode) -> dict:
    """Greedy decoding on `records` (`greedy_completions`, with its keyword arguments `decode`):
    exact-call accuracy (binary reward 1), format-failure rate, mean response length, and the
    counts scored and dropped."""
    kept, completions, lengths, drops = greedy_completions(model_config, params, tokenizer, records, **decode)
    reward, reasons = rewards_lib.batch_rewards(completions, [r.answer for r in kept], "binary")
    n = max(len(kept), 1)
    return {
        "accuracy": float(np.sum(reward) / n),
        "format_failure_rate": float(sum(r in FORMAT_FAILURES for r in reasons) / n),
        "response_length": float(np.mean(lengths)) if lengths else 0.0,
        **rewards_lib.reasoning_stats(completions),
        "num_scored": len(kept),
        "num_dropped": int(sum(drops.values())),
    }
