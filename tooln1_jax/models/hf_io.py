"""Hugging Face checkpoints in and out: config.json + (sharded) safetensors.

Loading reads tensor by tensor with `safe_open` (memory-mapped, numpy; bf16 arrives as
`ml_dtypes.bfloat16`) and builds each param leaf with `jax.make_array_from_callback`:
each device's shard is read straight from the files, so the model is never held twice
in host memory. Per-layer tensors are stacked on the leading `layers` axis by filling one
buffer per shard layer by layer.

Layouts: torch `nn.Linear.weight` is [out, in]; ours is [in, out] (see transformer.py).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tooln1_jax.distributed import is_main, to_host
from tooln1_jax.models.model_config import ModelConfig
from tooln1_jax.models.transformer import param_shapes, param_sharding
from tooln1_jax.sharding import TRAIN_RULES

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# our leaf -> (HF tensor name, stored transposed). Layer names sit under "model.layers.{i}.".
_TOP_TENSORS = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}
_LAYER_TENSORS = {
    "input_norm": ("input_layernorm.weight", False),
    "q_proj": ("self_attn.q_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_proj": ("self_attn.k_proj.weight", True),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_proj": ("self_attn.v_proj.weight", True),
    "v_bias": ("self_attn.v_proj.bias", False),
    "o_proj": ("self_attn.o_proj.weight", True),
    "post_attn_norm": ("post_attention_layernorm.weight", False),
    "gate_proj": ("mlp.gate_proj.weight", True),
    "up_proj": ("mlp.up_proj.weight", True),
    "down_proj": ("mlp.down_proj.weight", True),
}
# Checkpoint tensors that carry nothing we need (old rotary caches).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint path that is neither a local folder nor fetchable from the hub (one-line message)."""


class CheckpointFormatError(ValueError):
    """A checkpoint folder whose files do not match its config (missing/unexpected/misshaped tensors)."""


def hf_tensor_name(leaf: str, layer: int | None = None) -> tuple[str, bool]:
    """Our leaf name (and layer index for per-layer leaves) -> (HF tensor name, transposed)."""
    if layer is None:
        return _TOP_TENSORS[leaf]
    name, transposed = _LAYER_TENSORS[leaf]
    return f"model.layers.{layer}.{name}", transposed


# ----------------------------------------------------------------------------- loading


def resolve_checkpoint_dir(path: str | os.PathLike) -> str:
    """A local folder as is; otherwise a hub id fetched via `snapshot_download` (normal cache).
    Raises `CheckpointNotFoundError` with one line when neither works (e.g. offline)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        raise CheckpointNotFoundError(f"checkpoint {path!r}: no such local folder (and not a valid hub id)") from None
    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, network: one clear line
        reason = type(e).__name__
        raise CheckpointNotFoundError(
            f"checkpoint {path!r}: not a local folder, and the Hugging Face hub could not provide it "
            f"({reason}; offline or unknown repo id?)"
        ) from None


def _weight_map(folder: str) -> dict[str, str]:
    """HF tensor name -> safetensors file path, from the index file or the single file."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointFormatError(f"{index}: no 'weight_map' object")
        return {name: os.path.join(folder, file) for name, file in weight_map.items()}
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.exists(single):
        from safetensors import safe_open

        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    raise CheckpointFormatError(f"{folder}: has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints load)")


def _index_key(index: tuple) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def _leaf_from_files(shape, sharding, read_slice):
    """One param leaf built shard by shard. `read_slice(index)` -> numpy for that index."""
    cache: dict = {}  # replicated shards read the same slice once

    def callback(index):
        key = _index_key(index)
        if key not in cache:
            cache[key] = read_slice(index)
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, callback)


def load_pretrained(path, *, dtype=jnp.float32, mesh=None, rules=None, compute_dtype: str | None = None):
    """Reads a HF Qwen2/Llama checkpoint folder (or hub id) -> (ModelConfig, params).

    `dtype` is the params dtype. With a `mesh`, each leaf is placed straight onto its
    sharding under `rules` (default `sharding.TRAIN_RULES`); without one, onto the default
    device. `compute_dtype` (e.g. "bfloat16") sets `config.dtype`.
    """
    folder = resolve_checkpoint_dir(path)
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise CheckpointNotFoundError(f"checkpoint {folder}: no config.json")
    try:
        config = ModelConfig.from_hf(folder)
    except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointFormatError(f"{os.path.join(folder, 'config.json')}: {what}") from None
    if compute_dtype is not None:
        config = config.replace(dtype=str(jnp.dtype(compute_dtype)))
    weight_map = _weight_map(folder)
    np_dtype = np.dtype(dtype)
    shapes = param_shapes(config)

    if mesh is not None:
        shardings = param_sharding(config, mesh, rules or TRAIN_RULES)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes, is_leaf=lambda x: isinstance(x, tuple))

    needed = {hf_tensor_name(k)[0] for k in shapes if k != "layers"}
    needed |= {hf_tensor_name(k, i)[0] for k in shapes["layers"] for i in range(config.num_layers)}
    missing = sorted(needed - set(weight_map))
    if missing:
        raise CheckpointFormatError(f"{folder}: missing {len(missing)} tensor(s) for this config.json, e.g. {missing[:3]}")
    tied_head = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(n for n in set(weight_map) - needed - tied_head if not _IGNORED.match(n))
    if unexpected:
        raise CheckpointFormatError(f"{folder}: {len(unexpected)} tensor(s) this model does not use, e.g. {unexpected[:3]}")

    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}

        def tensor(name: str):
            file = weight_map[name]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="numpy"))
            return handles[file].get_slice(name)

        def read(name: str, transposed: bool, expected: tuple, index: tuple) -> np.ndarray:
            t = tensor(name)
            stored = tuple(t.get_shape())
            if stored != (expected[::-1] if transposed else expected):
                want = expected[::-1] if transposed else expected
                raise CheckpointFormatError(f"{weight_map[name]}: tensor {name} has shape {stored}, config.json implies {want}")
            if transposed:
                return np.ascontiguousarray(t[index[::-1]].T.astype(np_dtype, copy=False))
            return np.ascontiguousarray(t[index].astype(np_dtype, copy=False))

        params: dict = {"layers": {}}
        for leaf, shape in shapes.items():
            if leaf == "layers":
                continue
            name, transposed = hf_tensor_name(leaf)
            params[leaf] = _leaf_from_files(
                shape, shardings[leaf], lambda idx, n=name, t=transposed, s=shape: read(n, t, s, idx)
            )
        for leaf, shape in shapes["layers"].items():

            def read_stacked(index, leaf=leaf, shape=shape):
                layers = range(config.num_layers)[index[0]]
                inner = index[1:]
                first = read(*hf_tensor_name(leaf, layers[0]), shape[1:], inner)
                out = np.empty((len(layers), *first.shape), np_dtype)
                out[0] = first
                for j, layer in enumerate(layers[1:], start=1):
                    out[j] = read(*hf_tensor_name(leaf, layer), shape[1:], inner)
                return out

            params["layers"][leaf] = _leaf_from_files(shape, shardings["layers"][leaf], read_stacked)
    return config, params


# ----------------------------------------------------------------------------- saving


def _hf_tensor_plan(config: ModelConfig, params: dict) -> list[tuple[str, Any]]:
    """[(HF name, thunk -> numpy in HF layout)] in HF's usual order (embed, layers, norm, head)."""
    plan = []

    def add(name, transposed, get):
        plan.append((name, lambda: np.ascontiguousarray(to_host(get()).T if transposed else to_host(get()))))

    add(*hf_tensor_name("embed"), lambda: params["embed"])
    for i in range(config.num_layers):
        for leaf in _LAYER_TENSORS:
            if leaf in params["layers"]:
                add(*hf_tensor_name(leaf, i), lambda leaf=leaf, i=i: params["layers"][leaf][i])
    add(*hf_tensor_name("final_norm"), lambda: params["final_norm"])
    if not config.tie_word_embeddings:
        add(*hf_tensor_name("lm_head"), lambda: params["lm_head"])
    return plan


def save_pretrained(config: ModelConfig, params: dict, path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer=None) -> str:
    """Writes config.json and safetensors (sharded with an index above `max_shard_bytes`)
    that `transformers.AutoModelForCausalLM.from_pretrained(path)` loads. Tied embeddings
    write no lm_head. Only one shard is on the host at a time. Returns the folder."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    expected = param_shapes(config)
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    if got != expected:
        raise ValueError(f"params do not match the config: shapes {got} vs expected {expected}")
    dtype = np.dtype(params["embed"].dtype)
    plan = _hf_tensor_plan(config, params)
    leaf_bytes = {}
    for leaf, shape in expected.items():
        if leaf != "layers":
            leaf_bytes[hf_tensor_name(leaf)[0]] = math.prod(shape) * np.dtype(params[leaf].dtype).itemsize
    for leaf, shape in expected["layers"].items():
        for i in range(config.num_layers):
            leaf_bytes[hf_tensor_name(leaf, i)[0]] = math.prod(shape[1:]) * np.dtype(params["layers"][leaf].dtype).itemsize

    shards: list[list[tuple[str, Any]]] = [[]]
    size = 0
    for name, get in plan:
        if shards[-1] and size + leaf_bytes[name] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, get))
        size += leaf_bytes[name]

    is_writer = is_main()
    if is_writer:
        os.makedirs(path, exist_ok=True)
        for stale in os.listdir(path):  # an older save's files would shadow or mix with these
            if stale == INDEX_FILE or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", stale):
                os.remove(os.path.join(path, stale))
        hf = config.to_hf()
        hf["torch_dtype"] = hf["dtype"] = dtype.name
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2)
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: get() for name, get in shard}  # every host joins multi-host gathers
        if is_writer:
            save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        del tensors
    if is_writer and len(shards) > 1:
        index = {"metadata": {"total_size": sum(leaf_bytes.values())}, "weight_map": weight_map}
        with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    if is_writer and tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
