"""Group rollouts: prefill each prompt once, share its KV cache with G rows, decode in `while_loop`s.

`sample` left-pads the prompts to a power-of-two length bucket (so a run compiles a few
programs, not one per batch) and prefills each prompt once, keeping only the last position's
logits. Row `i*n + j` is sample j of prompt i. The n rows of a group read their prompt's cache
in place rather than n copies of it (same numbers, less memory traffic), and write their own
tokens into a per-row continuation cache (`models/group_decode.py`). Decoding runs in one
jitted, donated program: a `lax.while_loop` per segment (`decode_windows`), each over a
continuation cache just big enough for its steps, and a step that reads weights and rotary
tables laid out once before the loops. (Measurements: docs/performance_history.md.) A row stops at
its first stop token (which it keeps); the loops exit when all rows have stopped or the budget
is spent. Everything after a row's stop is `pad_id` with log-prob 0 and mask False.

Sampling order follows Hugging Face: temperature, then top-k, then top-p. Tokens are drawn
by inverse CDF with one uniform per row and step (cheaper than a Gumbel number per logit).
Each row's uniforms come from `fold_in(fold_in(rng, row), step)`, so the result depends on
`rng` only, not on the batch's sharding over devices.

`logprobs` is always the log-probability of the sampled token under softmax(logits / T)
over the FULL vocabulary: exactly what the GRPO loss recomputes, so the on-policy ratio
starts at 1. With top-k / top-p active this is not the probability of the (truncated)
distribution the token was drawn from (a small off-policy bias; keep top_p=1, top_k=0 for
exact on-policy GRPO). With temperature 0 (greedy) it is log_softmax(logits).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tooln1_jax.models.group_decode import decode_weights, group_decode_step, rope_lookup_table
from tooln1_jax.models.kv_cache import KVCache, cache_sharding, grow_cache, init_cache
from tooln1_jax.models.lora import ADAPTER_KEY
from tooln1_jax.models.model_config import ModelConfig
from tooln1_jax.models.params import param_sharding, shard_params
from tooln1_jax.models.transformer import forward_cached, lm_head_weight
from tooln1_jax.sharding import SAMPLE_RULES, batch_sharding
from tooln1_jax.token_draw import SamplingFilters, row_uniforms, sample_logits

MIN_BUCKET = 16
# The decode loop runs in up to `decode_segments` (default DECODE_SEGMENTS) segments, the first
# of at least MIN_SEGMENT steps (see `decode_windows`); each segment is one more compiled loop body.
DECODE_SEGMENTS = 4
MIN_SEGMENT = 16


@flax.struct.dataclass
class SampleResult:
    """R = len(prompts) * num_samples rows; rows i*n ... (i+1)*n-1 continue prompt i."""

    tokens: jax.Array  # [R, max_new_tokens] int32; pad_id after a row's stop token
    logprobs: jax.Array  # [R, max_new_tokens] float32 log p(token) under softmax(logits/T); 0 where masked
    mask: jax.Array  # [R, max_new_tokens] bool; True up to and including the first stop token
    lengths: jax.Array  # [R] int32, the number of True entries of each mask row
    num_steps: jax.Array  # [] int32, token positions generated (< max_new_tokens iff every row stopped early)


@flax.struct.dataclass
class SamplingState:
    """The decode loop's carry (donated to the loop)."""

    tokens: jax.Array  # [R, M] int32
    logprobs: jax.Array  # [R, M] float32
    lengths: jax.Array  # [R] int32
    done: jax.Array  # [R] bool, the row has emitted a stop token
    step: jax.Array  # [] int32, the next column of `tokens` to fill
    row_keys: jax.Array  # [R] PRNG keys, one per row
    prefix: KVCache  # the prompts' cache, [B, P] slots, shared by each group's n rows
    cache: KVCache | None  # each row's generated tokens, [R, window] slots; None until the decode loop


def _constrain(state: SamplingState, mesh, rules) -> SamplingState:
    """Rows over the batch mesh axes; the cache by its logical axes."""
    if mesh is None:
        return state

    rows = state.tokens.shape[0]
    shardings = state.replace(
        tokens=batch_sharding(mesh, rules, 2, rows),
        logprobs=batch_sharding(mesh, rules, 2, rows),
        lengths=batch_sharding(mesh, rules, 1, rows),
        done=batch_sharding(mesh, rules, 1, rows),
        step=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
        row_keys=batch_sharding(mesh, rules, 1, rows),
        prefix=cache_sharding(state.prefix, mesh, rules),
        cache=None if state.cache is None else cache_sharding(state.cache, mesh, rules),
    )
    return jax.lax.with_sharding_constraint(state, shardings)


def _next_tokens(logits_t, state_like, step, temperature, top_p, stop_ids, filters, pad_id):
    """Samples column `step` for every row and marks rows that stop. Rows already done get pad_id."""
    tokens, logprobs = sample_logits(logits_t, row_uniforms(state_like.row_keys, step), temperature, top_p, filters)
    live = ~state_like.done
    tokens = jnp.where(live, tokens, pad_id)
    logprobs = jnp.where(live, logprobs, 0.0)
    done = state_like.done | (live & jnp.isin(tokens, stop_ids))
    lengths = state_like.lengths + live.astype(jnp.int32)
    return tokens, logprobs, done, lengths


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """The static (compile-time) settings of one `sample` call; the programs are cached on it."""

    num_samples: int
    max_new_tokens: int
    filters: SamplingFilters
    pad_id: int
    mesh: Any = None
    rules: Any = None


@functools.partial(jax.jit, static_argnames=("config", "plan"))
def _prefill(config, params, prompt_tokens, prompt_mask, rng, temperature, top_p, stop_ids, *, plan) -> SamplingState:
    """prompt_tokens, prompt_mask [B, P] (left-padded) -> the loop state after the first token."""
    b, p = prompt_tokens.shape
    rows, m, pad_id = b * plan.num_samples, plan.max_new_tokens, plan.pad_id
    hidden, prefix = forward_cached(
        config, params, prompt_tokens, prompt_mask, init_cache(config, b, p), last_only=True
    )
    head = lm_head_weight(params).astype(hidden.dtype)
    last_logits_t = (head.T @ hidden[:, -1].T).astype(jnp.float32)  # [V, B]: only the last position
    key_data = rng if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key_data, i))(jnp.arange(rows))
    state = SamplingState(
        tokens=jnp.full((rows, m), pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, m), jnp.float32),
        lengths=jnp.zeros((rows,), jnp.int32),
        done=jnp.zeros((rows,), jnp.bool_),
        step=jnp.zeros((), jnp.int32),
        row_keys=row_keys,
        prefix=prefix,
        cache=None,  # made by `_decode`, whose segments each grow it (a donated input never could be)
    )
    logits_t = jnp.repeat(last_logits_t, plan.num_samples, axis=1)  # [V, R]
    tokens, logprobs, done, lengths = _next_tokens(
        logits_t, state, 0, temperature, top_p, stop_ids, plan.filters, pad_id
    )
    state = state.replace(
        tokens=state.tokens.at[:, 0].set(tokens),
        logprobs=state.logprobs.at[:, 0].set(logprobs),
        done=done,
        lengths=lengths,
        step=jnp.ones((), jnp.int32),
    )
    return _constrain(state, plan.mesh, plan.rules)


@functools.partial(jax.jit, static_argnames=("config", "plan", "decode_segments"), donate_argnames=("state",))
def _decode(config, params, state, temperature, top_p, stop_ids, *, plan, decode_segments) -> SamplingState:
    """Runs the decode loops until every row is done or `max_new_tokens` columns are filled."""
    max_new_tokens, mesh, rules = plan.max_new_tokens, plan.mesh, plan.rules
    weights = decode_weights(config, params)  # sliced, fused and transposed once, outside the loop
    rope = rope_lookup_table(config, state.prefix.max_len + max_new_tokens)

    def body(s: SamplingState):
        prev = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=1, keepdims=False)
        logits_t, cache = group_decode_step(config, weights, prev, s.prefix, s.cache, rope=rope)
        tokens, logprobs, done, lengths = _next_tokens(
            logits_t, s, s.step, temperature, top_p, stop_ids, plan.filters, plan.pad_id
        )
        new = s.replace(
            tokens=jax.lax.dynamic_update_index_in_dim(s.tokens, tokens, s.step, axis=1),
            logprobs=jax.lax.dynamic_update_index_in_dim(s.logprobs, logprobs, s.step, axis=1),
            done=done,
            lengths=lengths,
            step=s.step + 1,
            cache=cache,
        )
        return _constrain(new, mesh, rules)

    # Step s feeds token s-1 and writes it at continuation slot s-1, so a cache of `window`
    # slots serves steps up to `window`.
    rows = state.tokens.shape[0]
    for window in decode_windows(max_new_tokens, decode_segments):
        cache = init_cache(config, rows, window) if state.cache is None else grow_cache(state.cache, window)
        state = _constrain(state.replace(cache=cache), mesh, rules)
        cond = lambda s, window=window: (s.step < max_new_tokens) & (s.step <= window) & ~jnp.all(s.done)
        state = jax.lax.while_loop(cond, body, state)
    return state.replace(cache=None)  # the caller needs tokens, not the continuation cache


def decode_windows(max_new_tokens: int, segments: int = DECODE_SEGMENTS) -> tuple[int, ...]:
    """The continuation-cache size of each decode segment, doubling up to max_new_tokens:
    (16, 32, 64, 128) for 128 new tokens and 4 segments.

    A step's attention reads every slot of its cache, filled or not, so one loop over a cache of
    max_new_tokens slots reads twice the slots a full-length rollout needs on average, and far
    more when rows stop early (tool calls are short next to an 8k budget). Each segment instead
    runs over a cache just big enough for its steps, grown (zero-padded) between segments, so a
    step reads fewer than twice the slots it needs once past the first window."""
    first = min(MIN_SEGMENT, max_new_tokens)
    return tuple(sorted({max(first, -(-max_new_tokens >> i)) for i in range(segments)}))


def length_bucket(length: int, cap: int | None = None) -> int:
    """The padded width of a batch whose longest prompt (or completion) has `length` tokens: the
    next power of two, at least MIN_BUCKET, at most `cap` (the completion's max_new_tokens).
    The one rule for the prompt width (sampler and update) and the update's completion width:
    powers of two keep the compiled programs to log2(cap / MIN_BUCKET) + 1 widths per side and
    pad under 2x the real tokens. Requires length <= cap; the result is >= length."""
    width = max(MIN_BUCKET, 1 << max(0, int(length) - 1).bit_length())
    return width if cap is None else min(int(cap), width)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (tokens, mask), each [len(prompts), length] int32, prompts right-aligned."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, prompt in enumerate(prompts):
        if len(prompt):
            tokens[i, length - len(prompt) :] = prompt
            mask[i, length - len(prompt) :] = 1
    return tokens, mask


def _check(
    config: ModelConfig,
    prompts,
    num_samples,
    max_new_tokens,
    temperature,
    top_p,
    top_k,
    stop_token_ids,
    decode_segments,
):
    if not len(prompts):
        raise ValueError("sample: prompts is empty")
    for i, prompt in enumerate(prompts):
        if not len(prompt):
            raise ValueError(f"sample: prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= int(t) < config.vocab_size]
        if bad:
            raise ValueError(f"sample: prompt {i} has token ids outside [0, vocab_size={config.vocab_size}): {bad[:5]}")
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"sample: num_samples={num_samples} and max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"sample: temperature={temperature} must be >= 0 (0 is greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample: top_p={top_p} must be in (0, 1]")
    if top_k < 0:
        raise ValueError(f"sample: top_k={top_k} must be >= 0 (0 disables top-k)")
    if decode_segments < 1:
        raise ValueError(f"sample: decode_segments={decode_segments} must be >= 1")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"sample: longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_position_embeddings={config.max_position_embeddings}"
        )
    bad_stops = [t for t in stop_token_ids if not 0 <= int(t) < config.vocab_size]
    if bad_stops:
        raise ValueError(f"sample: stop_token_ids {bad_stops} are outside [0, vocab_size={config.vocab_size})")


def sample(
    config: ModelConfig,
    params: dict,
    prompts: Sequence[Sequence[int]],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: Sequence[int] = (),
    rng: jax.Array,
    mesh=None,
    rules=None,
    pad_id: int = 0,
    decode_segments: int = DECODE_SEGMENTS,
) -> SampleResult:
    """`num_samples` completions of each prompt (token-id lists of any lengths).

    `params` are plain params (with LoRA, the merged ones: `lora.merged_params`, once per rollout).
    Returns a `SampleResult` with [len(prompts) * num_samples, max_new_tokens] tokens,
    logprobs and mask. With `mesh`, params and rows are placed under `rules`
    (default `SAMPLE_RULES`): rows split over the batch axes, weights tensor-parallel.
    `decode_segments` trades compile time (one loop body each) for attention reads (`decode_windows`)."""
    _check(config, prompts, num_samples, max_new_tokens, temperature, top_p, top_k, stop_token_ids, decode_segments)
    if ADAPTER_KEY in params["layers"]:  # decode_weights reads the base weights only
        raise ValueError("sample: params carry LoRA adapters (lora.attach); sample from lora.merge(...) instead")
    tokens, mask = left_pad(prompts, length_bucket(max(len(p) for p in prompts)), pad_id)
    stop_ids = jnp.asarray(list(stop_token_ids) or [-1], jnp.int32)  # -1 never matches a token
    rules = (rules or SAMPLE_RULES) if mesh is not None else None
    params = sampling_params(config, params, mesh, rules)
    if mesh is not None:
        tokens = jax.device_put(tokens, batch_sharding(mesh, rules, 2, len(prompts)))
        mask = jax.device_put(mask, batch_sharding(mesh, rules, 2, len(prompts)))
    filters = SamplingFilters(greedy=temperature == 0, top_k=int(top_k), use_top_p=top_p < 1.0)
    plan = DecodePlan(num_samples, max_new_tokens, filters, int(pad_id), mesh, rules)
    t = jnp.float32(temperature if temperature > 0 else 1.0)
    p = jnp.float32(top_p)
    state = _prefill(config, params, tokens, mask, rng, t, p, stop_ids, plan=plan)
    state = _decode(config, params, state, t, p, stop_ids, plan=plan, decode_segments=int(decode_segments))
    columns = jnp.arange(max_new_tokens)[None, :]
    return SampleResult(
        tokens=state.tokens,
        logprobs=state.logprobs,
        mask=columns < state.lengths[:, None],
        lengths=state.lengths,
        num_steps=state.step,
    )


@functools.lru_cache(maxsize=8)
def _cast_and_place(config: ModelConfig, mesh, rules):
    dt = jnp.dtype(config.dtype)
    out = None if mesh is None else param_sharding(config, mesh, rules)
    return jax.jit(lambda params: jax.tree.map(lambda x: x.astype(dt), params), out_shardings=out)


def sampling_params(config: ModelConfig, params: dict, mesh=None, rules=None) -> dict:
    """The params the sampler reads: in the compute dtype (`config.dtype`) and, with a mesh,
    under `rules`, cast and placed by one program, so a bfloat16 run's rollout holds and reads
    a bf16 copy (half the fp32 master's bytes) and no fp32 one. Every forward casts a weight to
    the compute dtype before using it, so casting first changes no token and no log-prob.
    Params already in the compute dtype are only placed (float32 on CPU: no copy)."""
    if all(x.dtype == jnp.dtype(config.dtype) for x in jax.tree.leaves(params)):
        return params if mesh is None else shard_params(params, config, mesh, rules)
    return _cast_and_place(config, mesh, rules)(params)


def compiled_program_count() -> int:
    """How many (prefill, decode) programs are compiled so far: a bucket-reuse check."""
    return _prefill._cache_size() + _decode._cache_size()
