"""Device mesh, logical-axis rules, and logical axes -> `NamedSharding`.

Every parameter and the KV cache carry logical axis names (`param_logical_axes`,
`KEY_CACHE_LOGICAL_AXES`, `VALUE_CACHE_LOGICAL_AXES`). A `ShardingRules` maps each logical
name onto mesh axes of a ("data", "fsdp", "tensor") mesh. Two rule sets ship:

- `TRAIN_RULES`: FSDP x tensor parallel. The batch is split over (data, fsdp); weights
  are split over fsdp on their `embed` dimension and over tensor on heads / mlp / vocab.
- `SAMPLE_RULES`: weights tensor-parallel only (replicated over data and fsdp, so a decode
  step gathers nothing); the batch and the cache are split over (data, fsdp).

A mesh axis is dropped from a dimension it does not divide (`fit_axes`), so every model
config runs on every mesh: a tiny test model on 8 devices is simply less sharded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# One mesh axis, several (the dimension is split over their product), or None (replicated).
MeshAxes = str | tuple | None


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh. One size may be -1: "all remaining devices".

    When the product of the sizes is smaller than the device count (but divides it), the
    mesh uses the first `product` devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    described = f"mesh data={data} fsdp={fsdp} tensor={tensor}"
    if sizes.count(-1) > 1:
        raise ValueError(f"{described}: at most one axis size may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"{described}: sizes must be positive (or -1 for the rest)")
    fixed = math.prod(s for s in sizes if s != -1)
    if len(devices) % fixed:
        raise ValueError(f"{described}: {fixed} does not divide the {len(devices)} available devices")
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devices) // fixed
    used = devices[: math.prod(sizes)]
    try:  # topology-aware placement on TPU/GPU; plain order elsewhere
        grid = mesh_utils.create_device_mesh(sizes, devices=used)
    except Exception:  # noqa: BLE001 - any layout failure falls back to device order
        grid = np.asarray(used, dtype=object).reshape(sizes)
    # Auto axes: jit propagates shardings from the inputs (GSPMD), no explicit-sharding types.
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis, tuple of mesh axes, or None (replicated)."""

    batch: MeshAxes = ("data", "fsdp")
    seq: MeshAxes = None
    vocab: MeshAxes = "tensor"
    embed: MeshAxes = None
    q_heads: MeshAxes = "tensor"
    kv_heads: MeshAxes = "tensor"
    mlp: MeshAxes = "tensor"
    layers: MeshAxes = None
    norm: MeshAxes = None
    head_dim: MeshAxes = None
    cache_seq: MeshAxes = None
    kv_heads_cache: MeshAxes = "tensor"
    lora_rank: MeshAxes = None  # a LoRA adapter's small inner dimension: never split

    def replace(self, **changes) -> ShardingRules:
        return dataclasses.replace(self, **changes)

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        """The mesh axes of one logical name, always as a tuple (empty when replicated)."""
        if logical is None:
            return ()
        if logical not in {f.name for f in dataclasses.fields(self)}:
            known = sorted(f.name for f in dataclasses.fields(self))
            raise KeyError(f"logical axis {logical!r} has no sharding rule; known: {known}")
        axes = getattr(self, logical)
        if axes is None:
            return ()
        return (axes,) if isinstance(axes, str) else tuple(axes)


TRAIN_RULES = ShardingRules(embed="fsdp")
SAMPLE_RULES = ShardingRules(embed=None)


def fit_axes(axes: Sequence[str], dim: int | None, mesh: Mesh, taken: set[str] = frozenset()) -> tuple[str, ...]:
    """The mesh axes (in order) that can split a dimension of size `dim`: an axis is kept
    only if the dimension stays divisible by the product of the kept sizes, and is not
    already used by another dimension (`taken`). Size-1 axes are dropped (they split nothing).
    """
    kept, product = [], 1
    for axis in axes:
        if axis not in mesh.shape:
            raise KeyError(f"sharding rule names mesh axis {axis!r}; the mesh has {tuple(mesh.shape)}")
        size = mesh.shape[axis]
        if size == 1 or axis in taken:
            continue
        if dim is not None and dim % (product * size):
            continue
        kept.append(axis)
        product *= size
    return tuple(kept)


def logical_to_spec(
    logical_axes: Sequence[str | None], mesh: Mesh, rules: ShardingRules, shape: Sequence[int] | None = None
) -> PartitionSpec:
    """One leaf's logical axes (e.g. ("layers", "embed", "mlp")) -> its PartitionSpec.
    With `shape`, axes that do not divide their dimension are dropped."""
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    taken: set[str] = set()
    spec = []
    for i, logical in enumerate(logical_axes):
        axes = fit_axes(rules.mesh_axes(logical), None if shape is None else shape[i], mesh, taken)
        taken.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _is_axes_leaf(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def logical_to_sharding(logical_axes_tree: Any, mesh: Mesh, rules: ShardingRules, shapes: Any = None) -> Any:
    """A tree of logical-axes tuples -> the same tree of `NamedSharding`. `shapes` (same tree,
    leaves are shape tuples, arrays or `jax.ShapeDtypeStruct`) enables the divisibility fit."""
    if shapes is None:
        return jax.tree.map(
            lambda ax: NamedSharding(mesh, logical_to_spec(ax, mesh, rules)), logical_axes_tree, is_leaf=_is_axes_leaf
        )

    def one(ax, shape):
        return NamedSharding(mesh, logical_to_spec(ax, mesh, rules, tuple(getattr(shape, "shape", shape))))

    return jax.tree.map(one, logical_axes_tree, shapes, is_leaf=_is_axes_leaf)


def batch_sharding(mesh: Mesh, rules: ShardingRules, ndim: int, batch_size: int | None = None) -> NamedSharding:
    """Sharding of an [batch, ...] array with `ndim` dims: the batch over the rules' batch axes,
    the rest replicated. With `batch_size`, axes that do not divide it are dropped."""
    axes = fit_axes(rules.mesh_axes("batch"), batch_size, mesh)
    first = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))
