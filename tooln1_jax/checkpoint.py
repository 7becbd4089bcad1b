"""Orbax checkpoints of a run: every N steps, the last K kept, restore the latest, export to HF.

One checkpoint is `<output_dir>/checkpoints/<step>/` with three items:
- `params`: the policy parameters (sharded arrays, restored onto their shardings);
- `opt_state`: the optimizer state;
- `meta` (JSON): step, data position (epoch, index into that epoch's shuffled order), the RNG
  seed the step keys derive from, the model config (for export) and the run config.
Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest. A checkpoint damaged later (a truncated
file, an empty `meta/metadata`) is skipped on restore, newest first, with a warning; it stays on
disk until the run saves that step again. The frozen GRPO reference is saved once, beside the
checkpoints (`<output_dir>/reference/`), since it never changes.

A LoRA run (`config.lora.rank > 0`) saves its adapters as `params` and their optimizer state,
never the base: the base is the run's pretrained folder or seeded random init, rebuilt from the
config in `meta` (`restore_policy` merges the two; `export_peft` writes the adapters alone).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from tooln1_jax.config import lora_settings
from tooln1_jax.models.hf_io import load_pretrained, save_pretrained
from tooln1_jax.models.lora import abstract_adapters, merge, save_peft_adapter
from tooln1_jax.models.model_config import ModelConfig
from tooln1_jax.models.params import abstract_params, sharded_init
from tooln1_jax.settings import LORA_OFF, LoraSettings
from tooln1_jax.sharding import TRAIN_RULES, make_mesh

ITEMS = ("params", "opt_state", "meta")


def _abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of a pytree of arrays (the restore target)."""

    def one(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


class CheckpointReadError(RuntimeError):
    """No checkpoint (or not the one asked for) could be read; the message names each folder and why."""


def _why(error: BaseException) -> str:
    """One line: the innermost cause's type and first line (orbax wraps tensorstore's error in a
    bare Exception whose message is a 60-line spec)."""
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


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
        self.unreadable: set[int] = set()  # steps restore skipped; save replaces them

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        """Saves (asynchronously by default); call only with finite values. A checkpoint of the
        same step that `restore` found unreadable is deleted first (orbax refuses to overwrite)."""
        if step in self.unreadable and step in self.all_steps():
            warnings.warn(f"replacing unreadable checkpoint {self.step_dir(step)}", RuntimeWarning, stacklevel=2)
            self.manager.delete(step)
        self.unreadable.discard(step)
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, force=True)

    def _restore_step(self, params_like: Any, opt_state_like: Any, step: int) -> tuple[Any, Any, dict]:
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params_like)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state_like)),
            meta=ocp.args.JsonRestore(),
        )
        try:
            out = self.manager.restore(step, args=args)
        except Exception as e:
            raise CheckpointReadError(f"cannot read checkpoint {self.step_dir(step)}: {_why(e)}") from e
        return out["params"], out["opt_state"], dict(out["meta"])

    def restore_latest_readable(self, params_like: Any, opt_state_like: Any) -> tuple[int, Any, Any, dict]:
        """(step, params, opt_state, meta) of the newest checkpoint that reads, placed like the
        given trees. Unreadable ones are skipped with a warning and left on disk, so one damaged
        file does not block every restart. Raises FileNotFoundError when there is no checkpoint,
        CheckpointReadError (naming each folder and why) when none reads."""
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        failures = []
        for step in steps:
            try:
                return (step, *self._restore_step(params_like, opt_state_like, step))
            except CheckpointReadError as e:
                self.unreadable.add(step)
                failures.append(str(e))
                warnings.warn(f"{e}; skipped (left on disk), trying an older checkpoint", RuntimeWarning, stacklevel=2)
        raise CheckpointReadError(f"no readable checkpoint under {self.directory}:\n  " + "\n  ".join(failures))

    def restore(self, params_like: Any, opt_state_like: Any, step: int | None = None) -> tuple[Any, Any, dict]:
        """(params, opt_state, meta) of `step`, placed like the given trees; without `step`, of
        the newest readable checkpoint (`restore_latest_readable`). Raises CheckpointReadError
        naming the folder when the asked step cannot be read."""
        if step is None:
            return self.restore_latest_readable(params_like, opt_state_like)[1:]
        return self._restore_step(params_like, opt_state_like, step)

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


def _open_read_only(checkpoint_dir: str) -> ocp.CheckpointManager:
    """A read-only manager of a run's output_dir or its `checkpoints/` folder."""
    directory = _resolve(checkpoint_dir)
    if epath.Path(directory, "checkpoints").is_dir():
        directory = os.path.join(directory, "checkpoints")
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True), item_names=ITEMS)


def _lora_of(run_config: dict) -> LoraSettings:
    """A checkpointed run's LoRA settings (off for a run from before `config.lora` existed)."""
    return lora_settings(ml_collections.ConfigDict(run_config)) if "lora" in run_config else LORA_OFF


def _frozen_base(run_config: dict, model_config: ModelConfig, mesh) -> Any:
    """A LoRA run's base, rebuilt as `run_setup.build_model` built it: its pretrained folder, or
    the random init seeded by the run's seed."""
    model = run_config["model"]
    if model["name_or_path"]:
        dtype = jnp.dtype(model["param_dtype"])
        return load_pretrained(model["name_or_path"], dtype=dtype, mesh=mesh, rules=TRAIN_RULES)[1]
    return sharded_init(model_config, model["param_dtype"], mesh, TRAIN_RULES)(jax.random.key(int(run_config["seed"])))


def restore_trained(
    checkpoint_dir: str, *, step: int | None = None, mesh: Any = None
) -> tuple[ModelConfig, LoraSettings, Any, dict]:
    """(model config, LoRA settings, trained params, run config) of a run's checkpoint (default:
    the latest) on `mesh` (default: FSDP over all devices): the policy params, or with LoRA the
    adapters alone. Every process calls it together."""
    manager = _open_read_only(checkpoint_dir)
    mesh = mesh or make_mesh()
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {manager.directory}")
        meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        model_config = ModelConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["model_config"].items()}
        )
        run_config = meta.get("config", {})
        lora = _lora_of(run_config)
        if lora.enabled:
            target = abstract_adapters(model_config, lora, mesh, TRAIN_RULES)
        else:
            param_dtype = run_config.get("model", {}).get("param_dtype", "float32")
            target = abstract_params(model_config, mesh, param_dtype, TRAIN_RULES)
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    finally:
        manager.close()
    return model_config, lora, restored["params"], run_config


def restore_policy(checkpoint_dir: str, *, step: int | None = None, mesh: Any = None) -> tuple[ModelConfig, Any]:
    """(model config, policy params) of a run's checkpoint (default: the latest), restored onto
    `mesh` (default: FSDP over all devices); a LoRA run's adapters are merged into its rebuilt
    base. `checkpoint_dir` is a run's output_dir or its `checkpoints/` folder. Every process
    calls it together."""
    mesh = mesh or make_mesh()
    model_config, lora, params, run_config = restore_trained(checkpoint_dir, step=step, mesh=mesh)
    if lora.enabled:
        params = jax.jit(merge, static_argnums=2)(_frozen_base(run_config, model_config, mesh), params, lora)
    return model_config, params


def export_hf(
    checkpoint_dir: str, out_dir: str, *, step: int | None = None, tokenizer: Any = None, mesh: Any = None
) -> str:
    """Writes the policy of a checkpoint (`restore_policy`; a LoRA run's merged) as an HF
    safetensors folder that `transformers` and `load_pretrained` read; every process calls it,
    process 0 writes. Returns `out_dir`."""
    model_config, params = restore_policy(checkpoint_dir, step=step, mesh=mesh)
    return save_pretrained(model_config, params, out_dir, tokenizer=tokenizer)


def export_peft(checkpoint_dir: str, out_dir: str, *, step: int | None = None, mesh: Any = None) -> str:
    """Writes a LoRA run's adapters (no base) as a PEFT adapter folder (`lora.save_peft_adapter`)
    naming the run's `model.name_or_path` as its base. Every process calls it, process 0 writes.
    Returns `out_dir`."""
    model_config, lora, adapters, run_config = restore_trained(checkpoint_dir, step=step, mesh=mesh)
    if not lora.enabled:
        raise ValueError(f"{checkpoint_dir} is not a LoRA run (config.lora.rank is 0): export it with export_hf")
    base = run_config.get("model", {}).get("name_or_path", "")
    return save_peft_adapter(model_config, lora, adapters, out_dir, base_model_name_or_path=base)
