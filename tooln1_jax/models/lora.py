"""LoRA: low-rank adapters on a frozen base, as pure functions of two pytrees.

The adapters of `LoraSettings` are a tree shaped like the params' per-layer entry, float32
whatever the base's dtype:

    {"layers": {"q_proj": {"a": [L, in, r], "b": [L, r, out]}, ...}}   (one entry per target)

plus, with `train_norms`, `"norms"`: every RMSNorm weight trained whole, in the params' own tree
layout (`{"layers": {"input_norm": [L, D], "post_attn_norm": [L, D]}, "final_norm": [D]}`),
starting from the base's values (PEFT's `modules_to_save`). A frozen base's norms fix the scale of
every logit; a random base (the tiny demo's, tied embeddings of std 0.02) then caps any logit
near 0.02 * D, and LoRA alone cannot fit the data.

A follows its base weight's input axis and B its output axis (the base's logical axes from
`PARAM_SPECS`; the rank axis, `lora_rank`, is never split), so FSDP and tensor parallelism
place them as they place the base. One update, (alpha / rank) * A @ B, used three ways:

- `attach`: the base params with each layer's adapters beside its weights (`lp["lora"]`), for
  training and log-probs; `transformer.dense` adds (x @ A) @ (scale * B) to x @ W. The base is
  read, never copied, and without the adapters it is the GRPO reference;
- `merge`: W + scale * A @ B as plain params, for the sampler (once per rollout) and HF export;
- `save_peft_adapter`: PEFT's adapter folder, which `peft.PeftModel.from_pretrained` loads.

Init as PEFT's: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a = sqrt(5)), B = 0, so fresh
adapters leave the model unchanged.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from safetensors.numpy import save_file

from tooln1_jax.distributed import is_main, to_host
from tooln1_jax.models.model_config import ModelConfig
from tooln1_jax.models.params import PARAM_SPECS, param_sharding
from tooln1_jax.settings import LoraSettings
from tooln1_jax.sharding import ShardingRules, logical_to_sharding

ADAPTER_KEY = "lora"  # where `attach` puts the adapters in the params' "layers" entry
NORMS_KEY = "norms"  # the adapters' entry of norm weights trained whole (`train_norms`)
NORM_PARAMS = ("input_norm", "post_attn_norm", "final_norm")  # names in PARAM_SPECS
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


def _check(lora: LoraSettings) -> None:
    if not lora.enabled:
        raise ValueError("LoRA is off (rank 0): there are no adapters")


def _norms_tree(value) -> dict:
    """{"layers": {name: value(name)}, name: value(name)}: the norm weights where the params keep them."""
    tree: dict = {}
    for name in NORM_PARAMS:
        (tree.setdefault("layers", {}) if PARAM_SPECS[name].stacked else tree)[name] = value(name)
    return tree


def _norm_of(tree: dict, name: str):
    """The norm `name` of a params-shaped tree (stacked ones sit under "layers")."""
    return (tree["layers"] if PARAM_SPECS[name].stacked else tree)[name]


def adapter_shapes(config: ModelConfig, lora: LoraSettings) -> dict:
    """The adapters' tree with a shape tuple at each leaf: a [L, in, r], b [L, r, out] (and the
    norms' stored shapes with `train_norms`)."""
    _check(lora)
    out = {}
    for leaf in lora.target_leaves:
        d_in, d_out = PARAM_SPECS[leaf].shape(config)
        out[leaf] = {"a": (config.num_layers, d_in, lora.rank), "b": (config.num_layers, lora.rank, d_out)}
    tree = {"layers": out}
    if lora.train_norms:
        tree[NORMS_KEY] = _norms_tree(lambda name: PARAM_SPECS[name].stored_shape(config))
    return tree


def adapter_logical_axes(lora: LoraSettings) -> dict:
    """The adapters' tree with logical axes at each leaf: A takes its base weight's input axis,
    B its output axis (`PARAM_SPECS`); trained norms keep their own."""
    _check(lora)
    out = {}
    for leaf in lora.target_leaves:
        axis_in, axis_out = PARAM_SPECS[leaf].logical_axes
        out[leaf] = {"a": ("layers", axis_in, "lora_rank"), "b": ("layers", "lora_rank", axis_out)}
    tree = {"layers": out}
    if lora.train_norms:
        tree[NORMS_KEY] = _norms_tree(lambda name: PARAM_SPECS[name].stored_axes)
    return tree


def adapter_sharding(config: ModelConfig, lora: LoraSettings, mesh: Mesh, rules: ShardingRules) -> dict:
    """The adapters' tree of `NamedSharding` under `rules`."""
    return logical_to_sharding(adapter_logical_axes(lora), mesh, rules, adapter_shapes(config, lora))


def abstract_adapters(config: ModelConfig, lora: LoraSettings, mesh: Mesh, rules: ShardingRules) -> dict:
    """The adapters as float32 `jax.ShapeDtypeStruct`s placed by `rules` (a restore target)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh),
        adapter_shapes(config, lora),
        adapter_sharding(config, lora, mesh, rules),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def init_adapters(config: ModelConfig, lora: LoraSettings, rng: jax.Array, base: dict | None = None) -> dict:
    """Fresh float32 adapters: A uniform in +-1/sqrt(in) (PEFT's default), B zero; with
    `train_norms`, the norms copied from `base` (required then), so the model starts unchanged."""
    shapes = adapter_shapes(config, lora)["layers"]
    keys = jax.random.split(rng, len(shapes))
    out = {}
    for key, (leaf, s) in zip(keys, shapes.items()):
        bound = 1.0 / np.sqrt(s["a"][1])
        a = jax.random.uniform(key, s["a"], jnp.float32, -bound, bound)
        out[leaf] = {"a": a, "b": jnp.zeros(s["b"], jnp.float32)}
    tree = {"layers": out}
    if lora.train_norms:
        if base is None:
            raise ValueError("init_adapters: lora.train_norms starts the norms from the base; pass base=")
        tree[NORMS_KEY] = _norms_tree(lambda name: _norm_of(base, name).astype(jnp.float32))
    return tree


def _with_norms(params: dict, adapters: dict) -> dict:
    """`params` with the trained norms (if any) in place of the base's, in the base's dtype."""
    norms = adapters.get(NORMS_KEY)
    if norms is None:
        return params
    cast = {k: v.astype(params[k].dtype) for k, v in norms.items() if k != "layers"}
    layers = {k: v.astype(params["layers"][k].dtype) for k, v in norms["layers"].items()}
    return {**params, **cast, "layers": {**params["layers"], **layers}}


def attach(params: dict, adapters: dict, lora: LoraSettings) -> dict:
    """The params with the adapters beside each layer's weights, under `lp["lora"]`, B already
    scaled by alpha / rank (traced: the gradient reaches the stored B), and the trained norms in
    place of the base's. Nothing is copied."""
    scaled = {leaf: {"a": ab["a"], "b": ab["b"] * lora.scale} for leaf, ab in adapters["layers"].items()}
    params = _with_norms(params, adapters)
    return {**params, "layers": {**params["layers"], ADAPTER_KEY: scaled}}


def merge(params: dict, adapters: dict, lora: LoraSettings) -> dict:
    """Plain params with each adapted weight W [L, in, out] replaced by W + (alpha / rank) A @ B,
    summed in float32 and stored in W's dtype, and the trained norms in place of the base's."""
    params = _with_norms(params, adapters)
    layers = dict(params["layers"])
    for leaf, ab in adapters["layers"].items():
        w = layers[leaf]
        delta = jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
        layers[leaf] = (w.astype(jnp.float32) + lora.scale * delta).astype(w.dtype)
    return {**params, "layers": layers}


@functools.lru_cache(maxsize=8)
def _merge_program(config: ModelConfig, lora: LoraSettings, mesh: Mesh | None, rules: ShardingRules | None):
    out = None if mesh is None else param_sharding(config, mesh, rules)
    return jax.jit(functools.partial(merge, lora=lora), out_shardings=out)


def merged_params(
    config: ModelConfig,
    params: dict,
    adapters: dict,
    lora: LoraSettings,
    *,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
) -> dict:
    """`merge`, jitted (compiled once per config) and, with a mesh, written straight onto the
    `rules` layout (the sampler's, `SAMPLE_RULES`, for a rollout)."""
    return _merge_program(config, lora, mesh, rules if mesh is not None else None)(params, adapters)


# ----------------------------------------------------------------------------- PEFT's adapter folder


def _module_name(leaf: str, layer: int) -> str:
    """transformers' module path of a layer's weight, e.g. model.layers.0.self_attn.q_proj."""
    return PARAM_SPECS[leaf].hf_tensor(layer).removesuffix(".weight")


def peft_tensors(config: ModelConfig, adapters: dict) -> dict[str, np.ndarray]:
    """PEFT's state dict of the adapters, float32 in torch's [out, in] layout: per layer and target
    `base_model.model.<module>.lora_A.weight` [r, in] and `... .lora_B.weight` [out, r]; trained
    norms as `base_model.model.<module>.weight` (PEFT's key for a module in `modules_to_save`).
    Every process calls it (multi-host arrays are gathered)."""
    out = {}
    for leaf, ab in adapters["layers"].items():
        a, b = to_host(ab["a"]), to_host(ab["b"])
        for i in range(config.num_layers):
            module = f"base_model.model.{_module_name(leaf, i)}"
            out[f"{module}.lora_A.weight"] = np.ascontiguousarray(a[i].T, np.float32)
            out[f"{module}.lora_B.weight"] = np.ascontiguousarray(b[i].T, np.float32)
    norms = adapters.get(NORMS_KEY)
    for name in NORM_PARAMS if norms is not None else ():
        w, spec = to_host(_norm_of(norms, name)), PARAM_SPECS[name]
        for i in range(config.num_layers) if spec.stacked else [None]:
            out[f"base_model.model.{spec.hf_tensor(i)}"] = np.ascontiguousarray(w[i] if spec.stacked else w, np.float32)
    return out


def _peft_norm_modules() -> set[str]:
    """transformers' module names of the norms (their last dotted part), as PEFT matches them."""
    return {PARAM_SPECS[name].hf_name.removesuffix(".weight").rsplit(".", 1)[-1] for name in NORM_PARAMS}


def peft_config(lora: LoraSettings, base_model_name_or_path: str = "") -> dict:
    """adapter_config.json: a LoRA adapter for a causal LM, no dropout, no bias, PEFT's alpha / r scaling."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(lora.target_leaves),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": sorted(_peft_norm_modules()) if lora.train_norms else None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_peft_adapter(
    config: ModelConfig, lora: LoraSettings, adapters: dict, path, *, base_model_name_or_path: str = ""
) -> str:
    """Writes `adapter_config.json` and `adapter_model.safetensors` into `path` (process 0 writes;
    every process calls it). `peft.PeftModel.from_pretrained(base, path)` then gives the merged
    model's logits. Returns the folder."""
    path = os.fspath(path)
    tensors = peft_tensors(config, adapters)
    if is_main():
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, PEFT_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(peft_config(lora, base_model_name_or_path), f, indent=2)
        save_file(tensors, os.path.join(path, PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    return path
