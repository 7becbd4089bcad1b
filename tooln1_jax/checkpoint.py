"""Orbax checkpoints of a run: every N steps, the last K kept, restore the latest, export to HF.

One checkpoint is `<output_dir>/checkpoints/<step>/` with three items:
- `params`: the policy parameters (sharded arrays, restored onto their shardings);
- `opt_state`: the optimizer state;
- `meta` (JSON): step, data position (epoch, index into that epoch's shuffled order), the RNG
  seed the step keys derive from, the model config (for export) and the run config.
Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest. The frozen GRPO reference is saved
once, beside the checkpoints (`<output_dir>/reference/`), since it never changes.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from tooln1_jax.models.config import ModelConfig
from tooln1_jax.models.hf_io import save_pretrained
from tooln1_jax.sharding import make_mesh
from tooln1_jax.train_step import abstract_params

ITEMS = ("params", "opt_state", "meta")


def _abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of a pytree of arrays (the restore target)."""
    def one(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


def _resolve(path: str) -> str:
    """Absolute local paths; URLs (gs://, which orbax writes to directly) stay as they are."""
    return path if "://" in path else os.path.abspath(path)


class RunCheckpointer:
    """A `CheckpointManager` for one run's `checkpoints/` folder."""

    def __init__(self, output_dir: str, *, keep: int = 2, async_save: bool = True):
        self.directory = _resolve(os.path.join(output_dir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        """Saves (asynchronously by default); call only with finite values."""
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, params_like: Any, opt_state_like: Any, step: int | None = None) -> tuple[Any, Any, dict]:
        """(params, opt_state, meta) of `step` (default: the latest), placed like the given trees."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params_like)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state_like)),
            meta=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(step, args=args)
        return out["params"], out["opt_state"], dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def reference_dir(output_dir: str) -> str:
    return _resolve(os.path.join(output_dir, "reference"))


def save_reference(output_dir: str, params: Any) -> None:
    """The frozen reference parameters, written once (atomically) per run."""
    path = reference_dir(output_dir)
    # Process 0's view decides for all, so no process saves alone (orbax saves are collective).
    if multihost_utils.broadcast_one_to_all(np.int32(epath.Path(path).exists())):
        return
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params)


def restore_reference(output_dir: str, params_like: Any) -> Any:
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(reference_dir(output_dir), _abstract(params_like))


def restore_policy(checkpoint_dir: str, *, step: int | None = None, mesh: Any = None) -> tuple[ModelConfig, Any]:
    """(model config, policy params) of a run's checkpoint (default: the latest), restored onto
    `mesh` (default: FSDP over all devices). `checkpoint_dir` is a run's output_dir or its
    `checkpoints/` folder. Every process calls it together."""
    directory = _resolve(checkpoint_dir)
    if epath.Path(directory, "checkpoints").is_dir():
        directory = os.path.join(directory, "checkpoints")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True), item_names=ITEMS)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {directory}")
        meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        model_config = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["model_config"].items()})
        param_dtype = meta.get("config", {}).get("model", {}).get("param_dtype", "float32")
        target = abstract_params(model_config, mesh or make_mesh(), param_dtype)
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    finally:
        manager.close()
    return model_config, restored["params"]


def export_hf(checkpoint_dir: str, out_dir: str, *, step: int | None = None, tokenizer: Any = None,
              mesh: Any = None) -> str:
    """Writes the policy of a checkpoint (`restore_policy`) as an HF safetensors folder that
    `transformers` and `load_pretrained` read; every process calls it, process 0 writes.
    Returns `out_dir`."""
    model_config, params = restore_policy(checkpoint_dir, step=step, mesh=mesh)
    return save_pretrained(model_config, params, out_dir, tokenizer=tokenizer)
