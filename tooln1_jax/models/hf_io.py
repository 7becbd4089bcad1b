"""Hugging Face checkpoints in and out: config.json + (sharded) safetensors.

Loading reads tensor by tensor with `safe_open` (memory-mapped, numpy; bf16 arrives as
`ml_dtypes.bfloat16`) and builds each param leaf with `jax.make_array_from_callback`:
each device's shard is read straight from the files, so the model is never held twice
in host memory. Per-layer tensors are stacked on the leading `layers` axis by filling one
buffer per shard layer by layer.

Layouts: torch `nn.Linear.weight` is [out, in]; ours is [in, out] (see params.py).
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
from safetensors import safe_open
from safetensors.numpy import save_file

from tooln1_jax.distributed import is_main, to_host
from tooln1_jax.models.model_config import ModelConfig
from tooln1_jax.models.params import (
    PARAM_SPECS,
    ParamSpec,
    is_param_spec,
    param_shapes,
    param_sharding,
    param_specs,
)
from tooln1_jax.sharding import TRAIN_RULES

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# Checkpoint tensors that carry nothing we need (old rotary caches).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint path that is neither a local folder nor fetchable from the hub (one-line message)."""


class CheckpointFormatError(ValueError):
    """A checkpoint folder whose files do not match its config (missing/unexpected/misshaped tensors)."""


def hf_tensor_name(leaf: str, layer: int | None = None) -> tuple[str, bool]:
    """Our leaf name (and layer index for per-layer leaves) -> (HF tensor name, transposed)."""
    spec = PARAM_SPECS[leaf]
    return spec.hf_tensor(layer), spec.hf_transposed


def _hf_tensors(config: ModelConfig) -> list[tuple[str, ParamSpec, str, int | None]]:
    """(HF name, spec, leaf name, layer or None) of every checkpoint tensor `config` has, in
    HF's order: the non-stacked leaves around the layers, layer by layer."""
    layer_specs = [(n, s) for n, s in PARAM_SPECS.items() if s.stacked and s.present(config)]
    out = []
    for name, spec in PARAM_SPECS.items():
        if not spec.present(config):
            continue
        if not spec.stacked:
            out.append((spec.hf_tensor(), spec, name, None))
        elif name == layer_specs[0][0]:
            out += [(s.hf_tensor(i), s, n, i) for i in range(config.num_layers) for n, s in layer_specs]
    return out


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
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    raise CheckpointFormatError(
        f"{folder}: has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints load)"
    )


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


def _read_config(folder: str, compute_dtype: str | None) -> ModelConfig:
    """The folder's config.json as a ModelConfig (compute dtype `compute_dtype` when given)."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise CheckpointNotFoundError(f"checkpoint {folder}: no config.json")
    try:
        config = ModelConfig.from_hf(folder)
    except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointFormatError(f"{os.path.join(folder, 'config.json')}: {what}") from None
    if compute_dtype is not None:
        config = config.replace(dtype=str(jnp.dtype(compute_dtype)))
    return config


def _check_tensor_names(folder: str, config: ModelConfig, weight_map: dict[str, str]) -> None:
    """Raises `CheckpointFormatError` when the files miss a tensor `config` needs or hold one it does not use."""
    needed = {name for name, *_ in _hf_tensors(config)}
    missing = sorted(needed - set(weight_map))
    if missing:
        raise CheckpointFormatError(
            f"{folder}: missing {len(missing)} tensor(s) for this config.json, e.g. {missing[:3]}"
        )
    tied_head = {PARAM_SPECS["lm_head"].hf_tensor()} if config.tie_word_embeddings else set()
    unexpected = sorted(n for n in set(weight_map) - needed - tied_head if not _IGNORED.match(n))
    if unexpected:
        raise CheckpointFormatError(
            f"{folder}: {len(unexpected)} tensor(s) this model does not use, e.g. {unexpected[:3]}"
        )


def _slice_reader(weight_map: dict[str, str], stack: contextlib.ExitStack, np_dtype: np.dtype):
    """read(name, transposed, expected shape, index) -> numpy in our layout, files opened once (closed by `stack`)."""
    handles: dict[str, Any] = {}

    def read(name: str, transposed: bool, expected: tuple, index: tuple) -> np.ndarray:
        file = weight_map[name]
        if file not in handles:
            handles[file] = stack.enter_context(safe_open(file, framework="numpy"))
        t = handles[file].get_slice(name)
        stored = tuple(t.get_shape())
        want = expected[::-1] if transposed else expected
        if stored != want:
            raise CheckpointFormatError(f"{file}: tensor {name} has shape {stored}, config.json implies {want}")
        if transposed:
            return np.ascontiguousarray(t[index[::-1]].T.astype(np_dtype, copy=False))
        return np.ascontiguousarray(t[index].astype(np_dtype, copy=False))

    return read


def _load_leaf(spec: ParamSpec, config: ModelConfig, sharding, read, np_dtype: np.dtype) -> jax.Array:
    """One param leaf from the files; a stacked one fills one buffer per shard, layer by layer."""
    shape, one = spec.stored_shape(config), tuple(spec.shape(config))
    if not spec.stacked:
        return _leaf_from_files(shape, sharding, lambda index: read(spec.hf_tensor(), spec.hf_transposed, one, index))

    def read_stacked(index):
        layers = range(config.num_layers)[index[0]]
        first = read(spec.hf_tensor(layers[0]), spec.hf_transposed, one, index[1:])
        out = np.empty((len(layers), *first.shape), np_dtype)
        out[0] = first
        for j, layer in enumerate(layers[1:], start=1):
            out[j] = read(spec.hf_tensor(layer), spec.hf_transposed, one, index[1:])
        return out

    return _leaf_from_files(shape, sharding, read_stacked)


def load_pretrained(path, *, dtype=jnp.float32, mesh=None, rules=None, compute_dtype: str | None = None):
    """Reads a HF Qwen2/Llama checkpoint folder (or hub id) -> (ModelConfig, params).

    `dtype` is the params dtype. With a `mesh`, each leaf is placed straight onto its
    sharding under `rules` (default `sharding.TRAIN_RULES`); without one, onto the default
    device. `compute_dtype` (e.g. "bfloat16") sets `config.dtype`.
    """
    folder = resolve_checkpoint_dir(path)
    config = _read_config(folder, compute_dtype)
    weight_map = _weight_map(folder)
    _check_tensor_names(folder, config, weight_map)
    specs = param_specs(config)
    if mesh is not None:
        shardings = param_sharding(config, mesh, rules or TRAIN_RULES)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, specs, is_leaf=is_param_spec)
    np_dtype = np.dtype(dtype)
    with contextlib.ExitStack() as stack:
        read = _slice_reader(weight_map, stack, np_dtype)
        params = jax.tree.map(
            lambda spec, sharding: _load_leaf(spec, config, sharding, read, np_dtype),
            specs,
            shardings,
            is_leaf=is_param_spec,
        )
    return config, params


# ----------------------------------------------------------------------------- saving


def _hf_tensor_plan(config: ModelConfig, params: dict) -> list[tuple[str, int, Any]]:
    """[(HF name, bytes, thunk -> numpy in HF layout)] in HF's usual order (embed, layers, norm, head)."""
    plan = []
    for name, spec, leaf, layer in _hf_tensors(config):
        array = params["layers"][leaf] if spec.stacked else params[leaf]
        nbytes = math.prod(spec.shape(config)) * np.dtype(array.dtype).itemsize

        def get(array=array, layer=layer, transposed=spec.hf_transposed):
            host = to_host(array if layer is None else array[layer])
            return np.ascontiguousarray(host.T if transposed else host)

        plan.append((name, nbytes, get))
    return plan


def save_pretrained(
    config: ModelConfig, params: dict, path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer=None
) -> str:
    """Writes config.json and safetensors (sharded with an index above `max_shard_bytes`)
    that `transformers.AutoModelForCausalLM.from_pretrained(path)` loads. Tied embeddings
    write no lm_head. Only one shard is on the host at a time. Returns the folder."""
    path = os.fspath(path)
    expected = param_shapes(config)
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    if got != expected:
        raise ValueError(f"params do not match the config: shapes {got} vs expected {expected}")
    dtype = np.dtype(params["embed"].dtype)
    plan = _hf_tensor_plan(config, params)
    shards: list[list[tuple[str, Any]]] = [[]]
    size = 0
    for name, nbytes, get in plan:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, get))
        size += nbytes

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
        index = {"metadata": {"total_size": sum(nbytes for _, nbytes, _ in plan)}, "weight_map": weight_map}
        with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    if is_writer and tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
