"""The decoder's parameters, listed once: `PARAM_SPECS`.

Each parameter's shape, logical axes, initialiser and Hugging Face tensor name sit in one
`ParamSpec`, so the params tree, its sharding, its random init and the checkpoint mapping
(`hf_io.py`) cannot disagree. Params are a plain nested dict; per-layer weights are stacked on
a leading `layers` axis under the key "layers" (the forward scans over it):

    {"embed": ..., "layers": {"input_norm": ..., "q_proj": ..., ...}, "final_norm": ..., "lm_head": ...}

Weights are stored as [in, out], the transpose of torch's nn.Linear.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from tooln1_jax.models.model_config import ModelConfig
from tooln1_jax.sharding import ShardingRules, logical_to_sharding

INITS = ("normal", "zeros", "ones")


def _always(config: ModelConfig) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter. For a stacked (per-layer) one, `shape` and `logical_axes` describe one
    layer, and `hf_name` holds a "{layer}" field; `stored_shape` / `stored_axes` add the
    leading `layers` axis. `present(config)` says whether the config has it at all."""

    shape: Callable[[ModelConfig], tuple[int, ...]]
    logical_axes: tuple[str, ...]
    init: str  # one of INITS; "normal" draws normal(0, config.initializer_range)
    hf_name: str
    hf_transposed: bool  # the checkpoint holds it as torch's [out, in]
    stacked: bool = False
    present: Callable[[ModelConfig], bool] = _always

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}: expected one of {INITS}")

    def stored_shape(self, config: ModelConfig) -> tuple[int, ...]:
        return (config.num_layers, *self.shape(config)) if self.stacked else tuple(self.shape(config))

    @property
    def stored_axes(self) -> tuple[str, ...]:
        return ("layers", *self.logical_axes) if self.stacked else self.logical_axes

    def hf_tensor(self, layer: int | None = None) -> str:
        """The checkpoint tensor's name (of layer `layer` for a stacked parameter)."""
        if self.stacked != (layer is not None):
            raise ValueError(f"{self.hf_name}: a layer index goes with stacked parameters only")
        return self.hf_name.format(layer=layer) if self.stacked else self.hf_name


def _q_width(c: ModelConfig) -> int:
    return c.num_heads * c.head_dim


def _kv_width(c: ModelConfig) -> int:
    return c.num_kv_heads * c.head_dim


def _has_bias(c: ModelConfig) -> bool:
    return c.attention_bias  # q/k/v biases: Qwen2


def _untied(c: ModelConfig) -> bool:
    return not c.tie_word_embeddings  # tied models use the embedding as the output projection


def _layer(shape, axes, init, hf_name, transposed, present=_always) -> ParamSpec:
    return ParamSpec(shape, axes, init, f"model.layers.{{layer}}.{hf_name}", transposed, True, present)


# Leaf name -> spec, in Hugging Face's order (embed, layers, final norm, head), which is the
# order `save_pretrained` writes.
PARAM_SPECS: dict[str, ParamSpec] = {
    "embed": ParamSpec(
        lambda c: (c.vocab_size, c.hidden_size), ("vocab", "embed"), "normal", "model.embed_tokens.weight", False
    ),
    "input_norm": _layer(lambda c: (c.hidden_size,), ("norm",), "ones", "input_layernorm.weight", False),
    "q_proj": _layer(
        lambda c: (c.hidden_size, _q_width(c)), ("embed", "q_heads"), "normal", "self_attn.q_proj.weight", True
    ),
    "q_bias": _layer(lambda c: (_q_width(c),), ("q_heads",), "zeros", "self_attn.q_proj.bias", False, _has_bias),
    "k_proj": _layer(
        lambda c: (c.hidden_size, _kv_width(c)), ("embed", "kv_heads"), "normal", "self_attn.k_proj.weight", True
    ),
    "k_bias": _layer(lambda c: (_kv_width(c),), ("kv_heads",), "zeros", "self_attn.k_proj.bias", False, _has_bias),
    "v_proj": _layer(
        lambda c: (c.hidden_size, _kv_width(c)), ("embed", "kv_heads"), "normal", "self_attn.v_proj.weight", True
    ),
    "v_bias": _layer(lambda c: (_kv_width(c),), ("kv_heads",), "zeros", "self_attn.v_proj.bias", False, _has_bias),
    "o_proj": _layer(
        lambda c: (_q_width(c), c.hidden_size), ("q_heads", "embed"), "normal", "self_attn.o_proj.weight", True
    ),
    "post_attn_norm": _layer(lambda c: (c.hidden_size,), ("norm",), "ones", "post_attention_layernorm.weight", False),
    "gate_proj": _layer(
        lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"), "normal", "mlp.gate_proj.weight", True
    ),
    "up_proj": _layer(
        lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"), "normal", "mlp.up_proj.weight", True
    ),
    "down_proj": _layer(
        lambda c: (c.intermediate_size, c.hidden_size), ("mlp", "embed"), "normal", "mlp.down_proj.weight", True
    ),
    "final_norm": ParamSpec(lambda c: (c.hidden_size,), ("norm",), "ones", "model.norm.weight", False),
    "lm_head": ParamSpec(
        lambda c: (c.hidden_size, c.vocab_size), ("embed", "vocab"), "normal", "lm_head.weight", True, present=_untied
    ),
}


def param_specs(config: ModelConfig) -> dict:
    """The params tree's structure with the `ParamSpec` of each leaf `config` has."""
    tree: dict = {}
    for name, spec in PARAM_SPECS.items():
        if spec.present(config):
            (tree.setdefault("layers", {}) if spec.stacked else tree)[name] = spec
    return tree


def is_param_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def param_shapes(config: ModelConfig) -> dict:
    """The params pytree's structure as {name: shape}."""
    return jax.tree.map(lambda s: s.stored_shape(config), param_specs(config), is_leaf=is_param_spec)


def param_logical_axes(config: ModelConfig) -> dict:
    """Same tree as the params, with a tuple of logical axis names at each leaf."""
    return jax.tree.map(lambda s: s.stored_axes, param_specs(config), is_leaf=is_param_spec)


def param_sharding(config: ModelConfig, mesh: Mesh, rules: ShardingRules) -> dict:
    """The params tree of `NamedSharding` for a `ModelConfig` (usable as jit in/out_shardings)."""
    return logical_to_sharding(param_logical_axes(config), mesh, rules, param_shapes(config))


def shard_params(params: dict, config: ModelConfig, mesh: Mesh, rules: ShardingRules) -> dict:
    """Moves (or reshards) a params tree onto the mesh under `rules`."""
    return jax.device_put(params, param_sharding(config, mesh, rules))


def abstract_params(config: ModelConfig, mesh: Mesh, dtype, rules: ShardingRules) -> dict:
    """The params tree as `jax.ShapeDtypeStruct`s placed by `rules` (a restore target; no arrays made)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s, jnp.dtype(dtype), sharding=sh),
        param_shapes(config),
        param_sharding(config, mesh, rules),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def init_params(config: ModelConfig, rng: jax.Array, dtype=jnp.float32) -> dict:
    """Random params, each leaf by its spec's `init`: normal(0, `config.initializer_range`) weights,
    zero biases, unit norms."""
    flat, treedef = jax.tree.flatten(param_specs(config), is_leaf=is_param_spec)
    keys = jax.random.split(rng, len(flat))
    leaves = []
    for spec, key in zip(flat, keys):
        shape = spec.stored_shape(config)
        if spec.init == "ones":
            leaves.append(jnp.ones(shape, dtype))
        elif spec.init == "zeros":
            leaves.append(jnp.zeros(shape, dtype))
        else:
            leaves.append((config.initializer_range * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, leaves)


@functools.lru_cache(maxsize=8)
def sharded_init(config: ModelConfig, param_dtype: str, mesh: Mesh, rules: ShardingRules):
    """A jitted `init_params(config, rng)` that writes each leaf straight onto its `rules`
    sharding (cached, so repeated runs in one process compile it once)."""
    init = functools.partial(init_params, config, dtype=jnp.dtype(param_dtype))
    return jax.jit(init, out_shardings=param_sharding(config, mesh, rules))
