"""Everything a run needs before its first step, shared by GRPO (`train`) and SFT (`sft`):
tokenizer, records and their train / held-out split, encoded training prompts, mesh and model;
and the greedy held-out accuracy both report.

Set-up runs in two stages, each failing on every process when it fails on one
(`distributed.all_or_none`): a data file missing on one host stops every host with its error.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from tooln1_jax import distributed, rollouts
from tooln1_jax.assets import default_cache_dir
from tooln1_jax.config import ConfigError, lora_settings, rollout_prompts, settings_from, validate_config
from tooln1_jax.data import sources, synthetic
from tooln1_jax.data.prompt import encode_prompts
from tooln1_jax.data.records import DropCounts, ToolRecord, train_val_split
from tooln1_jax.data.tiny_tokenizer import load_or_build_tiny_tokenizer
from tooln1_jax.data.xlam import convert_rows
from tooln1_jax.models import ModelConfig, load_pretrained
from tooln1_jax.models.hf_io import resolve_checkpoint_dir
from tooln1_jax.models.lora import adapter_sharding, init_adapters, merged_params
from tooln1_jax.models.params import sharded_init
from tooln1_jax.sharding import SAMPLE_RULES, TRAIN_RULES, make_mesh


@dataclasses.dataclass
class RunSetup:
    """What a run needs before its first step: mesh, tokenizer, model, and the data split.
    `train_prompt_ids[i]` is the encoded prompt of `train_records[i]` (over-long ones dropped)."""

    config: Any
    mesh: Any
    tokenizer: Any
    model_config: ModelConfig
    params: Any  # None when the run resumes from a checkpoint (restored later)
    train_records: list
    train_prompt_ids: list
    val_records: list
    drops: DropCounts
    ood_records: list = dataclasses.field(default_factory=list)  # see `ood_records`


def build_tokenizer(config):
    """The run's tokenizer: the demo's tiny one (built once, then cached on disk) or an HF one."""
    t = config.tokenizer
    if t.kind == "tiny":
        path = t.name_or_path or os.path.join(default_cache_dir(), f"tiny_tokenizer_{t.vocab_size}")
        return load_or_build_tiny_tokenizer(path, vocab_size=int(t.vocab_size))
    from transformers import AutoTokenizer  # at its one point of use: it imports torch (seconds per CLI start)

    return AutoTokenizer.from_pretrained(t.name_or_path or config.model.name_or_path)


def _synthetic_knobs(config) -> tuple[int, int, synthetic.SyntheticConfig]:
    """(num_examples, seed, SyntheticConfig) of `config.data.synthetic`."""
    knobs = dict(config.data.synthetic)
    num = int(knobs.pop("num_examples"))
    seed = int(knobs.pop("seed", config.seed))
    fields = {f.name for f in dataclasses.fields(synthetic.SyntheticConfig)}
    unknown = sorted(set(knobs) - fields)
    if unknown:
        raise ConfigError(
            f"config.data.synthetic has unknown fields {unknown}; known: num_examples, seed, {sorted(fields)}"
        )
    try:
        sc = synthetic.SyntheticConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in knobs.items()})
    except ValueError as e:
        raise ConfigError(f"config.data.{e}") from None
    return num, seed, sc


def _synthetic_records(config) -> tuple[list[ToolRecord], DropCounts]:
    """The synthetic tasks of `config.data.synthetic` (its knobs are `SyntheticConfig` fields)."""
    num, seed, sc = _synthetic_knobs(config)
    return convert_rows(synthetic.generate(num, sc, seed=seed), source="synthetic")


def ood_records(config) -> list[ToolRecord]:
    """The out-of-distribution evaluation set: with synthetic data trained on `phrasing="seen"`,
    `eval.num_examples` problems worded only with the held-out templates, from their own random
    stream (so their tools and values are not the training problems'). Otherwise empty."""
    if config.data.source != "synthetic" or config.data.synthetic.get("phrasing", "all") != "seen":
        return []
    _, seed, sc = _synthetic_knobs(config)
    rows = synthetic.generate(
        int(config.eval.num_examples), dataclasses.replace(sc, phrasing="held_out"), seed=f"{seed}/held_out"
    )
    return convert_rows(rows, source="synthetic")[0]


def load_records(config) -> tuple[list[ToolRecord], DropCounts]:
    """All records of `config.data.source`, with the counted drops of their conversion."""
    d = config.data
    if d.source == "synthetic":
        return _synthetic_records(config)
    if d.source == "xlam":
        return sources.load_xlam(d.xlam_path)
    if d.source == "toolace":
        return sources.load_toolace(d.toolace_path)
    return sources.load_tool_n1_mix(d.xlam_path, d.toolace_path)


def _random_model_config(config, tokenizer) -> ModelConfig:
    """`config.model.random` as a ModelConfig (vocab_size 0 = the tokenizer's size)."""
    r = config.model.random
    return settings_from(
        ModelConfig,
        r,
        vocab_size=int(r.vocab_size) or len(tokenizer),
        attention_bias=r.model_type == "qwen2",
        eos_token_id=tokenizer.eos_token_id,
        dtype=config.model.dtype,
        remat=config.model.remat,
        attention_impl=config.model.attention_impl,
    )


def build_model(config, tokenizer, mesh, *, load_weights: bool = True) -> tuple[ModelConfig, Any]:
    """(ModelConfig, params placed on the mesh under TRAIN_RULES). Without `load_weights`,
    params is None (a resumed run restores them from its checkpoint)."""
    if config.model.name_or_path:
        if load_weights:
            model_config, params = load_pretrained(
                config.model.name_or_path,
                dtype=jnp.dtype(config.model.param_dtype),
                mesh=mesh,
                rules=TRAIN_RULES,
                compute_dtype=config.model.dtype,
            )
        else:
            folder = resolve_checkpoint_dir(config.model.name_or_path)
            model_config, params = ModelConfig.from_hf(folder, dtype=config.model.dtype), None
        model_config = model_config.replace(remat=config.model.remat, attention_impl=config.model.attention_impl)
    else:
        model_config = _random_model_config(config, tokenizer)
        params = None
        if load_weights:
            init = sharded_init(model_config, config.model.param_dtype, mesh, TRAIN_RULES)
            params = init(jax.random.key(config.seed))
    if len(tokenizer) > model_config.vocab_size:
        field = "config.model.random.vocab_size" if not config.model.name_or_path else "config.tokenizer.name_or_path"
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
            f"{model_config.vocab_size}: check {field}"
        )
    return model_config, params


def initial_adapters(config, model_config: ModelConfig, base: Any, mesh) -> Any:
    """Fresh adapters of `config.lora` placed on the mesh, if any (TRAIN_RULES), drawn from
    fold_in(key(seed), 1) (the base's random init takes key(seed)), trained norms copied from
    `base`: where SFT starts, and GRPO when there is no warm start."""
    lora = lora_settings(config)
    init = functools.partial(init_adapters, model_config, lora)
    sharding = None if mesh is None else adapter_sharding(model_config, lora, mesh, TRAIN_RULES)
    rng = jax.random.fold_in(jax.random.key(int(config.seed)), 1)
    return jax.jit(init, out_shardings=sharding)(rng, base)


def policy_params(config, model_config: ModelConfig, trainable: Any, base: Any, mesh) -> Any:
    """The policy as plain params, for the sampler and evaluation: `trainable` itself, or with
    LoRA the base with the adapters `trainable` merged in, laid out for sampling (SAMPLE_RULES):
    built once per rollout, where the sampler would reshard the params anyway."""
    lora = lora_settings(config)
    if not lora.enabled:
        return trainable
    return merged_params(model_config, base, trainable, lora, mesh=mesh, rules=SAMPLE_RULES)


COMPILATION_CACHE = "jax_compilation_cache"  # under `assets.default_cache_dir()` ($TOOLN1_CACHE)


def enable_compilation_cache() -> str:
    """Turns on JAX's persistent compilation cache, so a restarted or resumed run (or the next
    run of the same shapes) loads its programs instead of compiling them again (XLA keys each
    entry by the program, the compile options and the JAX version). A directory the user already
    set (`JAX_COMPILATION_CACHE_DIR`) is kept. Returns the directory in use."""
    path = jax.config.jax_compilation_cache_dir
    if not path:
        path = os.path.join(default_cache_dir(), COMPILATION_CACHE)
        jax.config.update("jax_compilation_cache_dir", path)
    return path


def setup_run(config, *, load_weights: bool = True) -> RunSetup:
    """Validates the config, starts the distributed runtime if asked, then on every process:
    tokenizer, records, train / held-out split and encoded training prompts (local work), then
    mesh and model. Each of the two stages fails on all processes if it fails on one
    (`distributed.all_or_none`), so a file missing on one host stops every host with its error."""
    validate_config(config)
    distributed.initialize_from_config(config.distributed)
    enable_compilation_cache()

    def data_stage():
        tokenizer = build_tokenizer(config)
        records, drops = load_records(config)
        train, val = train_val_split(
            records, seed=int(config.data.split_seed), val_fraction=float(config.data.val_fraction)
        )
        if config.data.max_train_examples:
            train = train[: int(config.data.max_train_examples)]
        prompt_ids, kept, prompt_drops = encode_prompts(
            tokenizer, train, max_prompt_length=int(config.data.max_prompt_length)
        )
        drops = drops.merged(DropCounts({f"train/{k}": v for k, v in prompt_drops.items()}))
        if len(kept) < rollout_prompts(config):
            raise ConfigError(
                f"the {rollout_prompts(config)} prompts per rollout (config.rl) exceed the {len(kept)} "
                f"training prompts left after filtering ({dict(drops)})"
            )
        _check_probe(config, val)
        return tokenizer, kept, prompt_ids, val, drops, ood_records(config)

    tokenizer, kept, prompt_ids, val, drops, ood = distributed.all_or_none("data setup", data_stage)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    model_config, params = distributed.all_or_none(
        "model setup", lambda: build_model(config, tokenizer, mesh, load_weights=load_weights)
    )
    return RunSetup(config, mesh, tokenizer, model_config, params, kept, prompt_ids, val, drops, ood)


def _check_probe(config, val: list) -> None:
    """The SFT stop probe needs its own held-out records after the evaluation's: checked at start.
    A warm start no longer than `sft.probe_every` steps is never probed (a toy run)."""
    if config.sft.stop_accuracy and config.sft.warm_start_steps > config.sft.probe_every:
        room = len(val) - int(config.eval.num_examples)
        if room < int(config.sft.probe_examples):
            raise ConfigError(
                f"config.sft.probe_examples={config.sft.probe_examples} exceeds the {max(room, 0)} held-out "
                f"records left after eval.num_examples={config.eval.num_examples}: raise data.val_fraction "
                "or lower one of them"
            )


def probe_records(config, setup: RunSetup) -> list[ToolRecord]:
    """The SFT stop probe: `sft.probe_examples` held-out records after the evaluation's first
    `eval.num_examples`, so the stop decision does not select on the reported accuracy."""
    first = int(config.eval.num_examples)
    return setup.val_records[first : first + int(config.sft.probe_examples)]


def held_out_accuracy(config, setup: RunSetup, params, *, records: Sequence[ToolRecord] | None = None) -> dict:
    """Greedy exact-call accuracy on `records` (default: the first `eval.num_examples` held-out ones)."""
    if records is None:
        records = setup.val_records[: int(config.eval.num_examples)]
    if not records:
        return {"accuracy": float("nan"), "format_failure_rate": float("nan"), "num_scored": 0}
    return rollouts.greedy_accuracy(
        setup.model_config,
        params,
        setup.tokenizer,
        records,
        max_new_tokens=int(config.eval.max_new_tokens),
        max_prompt_length=int(config.data.max_prompt_length),
        batch_size=int(config.eval.batch_size),
        mesh=setup.mesh,
    )


def sft_stop_probe(config, setup: RunSetup):
    """The warm start's stop probe for `sft.run_sft`: `trained` (the params, or with LoRA the
    adapters on `setup.params`) -> greedy accuracy of that policy on `probe_records`."""
    records = probe_records(config, setup)
    return lambda trained: held_out_accuracy(
        config, setup, policy_params(config, setup.model_config, trained, setup.params, setup.mesh), records=records
    )


def log_directory(config) -> str:
    """The local folder for metrics.jsonl, eval.jsonl, summary.json and the reward curve:
    `log.dir`, else `output_dir`; with a gs:// output_dir and no `log.dir`, runs/<run name>."""
    if config.log.dir:
        return config.log.dir
    if "://" in config.output_dir:
        return os.path.join("runs", config.output_dir.rstrip("/").rsplit("/", 1)[-1])
    return config.output_dir


def held_out_results(config, setup: RunSetup, params) -> dict:
    """`held_out_accuracy` on the evaluation set, plus the same on the out-of-distribution set
    (`ood_records`) under `ood_`-prefixed keys when the run has one: one evaluation row."""
    row = held_out_accuracy(config, setup, params)
    if setup.ood_records:
        ood = held_out_accuracy(config, setup, params, records=setup.ood_records)
        row.update({f"ood_{k}": ood[k] for k in ("accuracy", "format_failure_rate", "num_scored")})
    return row
