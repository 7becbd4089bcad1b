"""The run config: one `ml_collections.ConfigDict` schema and its validation.

Config files under `configs/` start from `default_config()`, change fields, and return
`validate_config(config)`. Every field can be overridden on the command line:

    python -m tooln1_jax.train --config configs/tiny_cpu.py --config.rl.kl_coef=0.0

Units: `rl.rollout_batch_size`, `rl.train_batch_size` and `rl.mini_batch_size` count PROMPTS (each
gives `rollout.num_samples` sequences); `rl.micro_batch_size` counts SEQUENCES. A "step" of the
loop is one rollout batch; it makes up to `train_batch_size / mini_batch_size * ppo_epochs` updates.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import ml_collections

from tooln1_jax.settings import (
    AGGREGATIONS,
    ATTENTION_IMPLS,
    KL_ESTIMATORS,
    LORA_TARGETS,
    MODEL_TYPES,
    REMAT_POLICIES,
    REWARD_VARIANTS,
    LoraSettings,
    LossSettings,
    OptimizerSettings,
)

DATA_SOURCES = ("synthetic", "xlam", "toolace", "mixed")
TOKENIZER_KINDS = ("hf", "tiny")
DTYPES = ("float32", "bfloat16", "float16")
# The loss's and optimizer's defaults live in their settings classes, which the config copies: every
# field but LossSettings.norm_constant and OptimizerSettings.eps.
_LOSS_FIELDS = {k: v for k, v in dataclasses.asdict(LossSettings()).items() if k != "norm_constant"}
_OPTIM_FIELDS = {k: v for k, v in dataclasses.asdict(OptimizerSettings(lr=1e-6)).items() if k != "eps"}


def default_config() -> ml_collections.ConfigDict:
    """Every field with a default; a tiny random Qwen2 on synthetic tasks unless changed."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.output_dir = "runs/default"

    # Multi-host start (TPU pods, SLURM): jax.distributed.initialize before anything else.
    # Empty / -1 arguments are auto-detected by JAX. A peer silent for heartbeat_timeout_s
    # seconds (killed, out of memory) stops every process with a non-zero exit.
    c.distributed = ml_collections.ConfigDict(
        dict(enabled=False, coordinator_address="", num_processes=-1, process_id=-1, heartbeat_timeout_s=100)
    )

    # name_or_path: an HF folder (config.json + safetensors) loaded with `load_pretrained`,
    # or "" for random weights with the `random` spec (vocab_size 0 = the tokenizer's size).
    c.model = ml_collections.ConfigDict(
        dict(
            name_or_path="",
            dtype="float32",  # compute dtype
            param_dtype="float32",
            remat="none",
            attention_impl="auto",  # ATTENTION_IMPLS; "auto": the best for the backend (models/attention.py)
            random=dict(
                model_type="qwen2",
                vocab_size=0,
                hidden_size=64,
                intermediate_size=128,
                num_layers=2,
                num_heads=4,
                num_kv_heads=2,
                head_dim=16,
                tie_word_embeddings=True,
                max_position_embeddings=1024,
                rope_theta=1_000_000.0,
                initializer_range=0.02,  # stddev of the random init's weights
            ),
        )
    )

    # LoRA (models/lora.py): rank 0 = off. On, the frozen base is also the KL reference (rl.ref_in_bf16
    # unused); SFT and GRPO train float32 adapters A [in, rank], B [rank, out], update (alpha / rank) A @ B,
    # on `targets` (comma-separated from q, k, v, o, gate, up, down). dropout: only 0 is implemented.
    # train_norms: also train every RMSNorm weight whole (PEFT's modules_to_save); a random base needs it.
    c.lora = ml_collections.ConfigDict({**dataclasses.asdict(LoraSettings()), "targets": ",".join(LORA_TARGETS)})

    # kind "hf": AutoTokenizer from name_or_path ("" = the model folder);
    # kind "tiny": the demo's small BPE tokenizer (tooln1_jax.data.tiny_tokenizer) of `vocab_size`
    # tokens, cached in name_or_path ("" = the cache dir).
    c.tokenizer = ml_collections.ConfigDict(dict(kind="tiny", name_or_path="", vocab_size=1024))

    c.data = ml_collections.ConfigDict(
        dict(
            source="synthetic",
            xlam_path="Salesforce/xlam-function-calling-60k",  # local json/jsonl/parquet or hub name
            toolace_path="Team-ACE/ToolACE",
            max_prompt_length=1024,
            val_fraction=0.1,
            max_train_examples=0,  # 0 = all
            split_seed=0,
            synthetic=dict(num_examples=2000),  # the demo helper adds its knobs here
        )
    )

    # Mesh over all devices: one size may be -1 ("the rest").
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

    # prompts_per_call: prompts per sampler call (0 = the whole rollout batch at once); bounds
    # the KV cache, which is rows x (prompt + response) long. decode_segments: the decode loop's
    # segments, each over a response cache twice the last's (`sampling.decode_windows`): more
    # segments read fewer empty cache slots and compile one more loop body each.
    c.rollout = ml_collections.ConfigDict(
        dict(
            num_samples=5, max_new_tokens=64, temperature=0.7, top_p=1.0, top_k=0, prompts_per_call=0, decode_segments=4
        )
    )

    c.rl = ml_collections.ConfigDict(
        dict(
            train_batch_size=8,  # prompts per rollout batch whose groups the update trains on (at most)
            rollout_batch_size=0,  # prompts sampled per step (0 = train_batch_size); see filter_zero_std_groups
            mini_batch_size=4,  # prompts per optimizer update
            micro_batch_size=0,  # sequences per gradient-accumulation chunk; 0 = whole mini-batch
            ppo_epochs=1,
            total_epochs=1,
            total_steps=0,  # rollout batches; 0 = total_epochs over the training split
            **_LOSS_FIELDS,  # clip_eps, kl_coef, kl_estimator, entropy_coef, aggregation
            reward_variant="binary",
            filter_zero_std_groups=False,  # train only groups with reward spread (DAPO's dynamic sampling)
            unbiased_std=True,
            ref_in_bf16=False,
        )
    )

    c.optim = ml_collections.ConfigDict(_OPTIM_FIELDS)  # lr, warmup_steps, weight_decay, b1, b2, grad_clip

    # SFT warm start before RL (0 steps = none, as in the paper), with optim's other fields;
    # max_completion_length 0 = rollout.max_new_tokens. stop_accuracy > 0: see sft.run_sft.
    c.sft = ml_collections.ConfigDict(
        dict(warm_start_steps=0, lr=1e-4, batch_size=16, warmup_steps=0, max_completion_length=0, log_every=25)
        | dict(stop_accuracy=0.0, stop_accuracy_max=1.0, stop_format_failure_max=1.0)  # the stop band
        | dict(probe_every=100, probe_examples=100)  # the probe it is measured on
    )

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=0, keep=2))  # 0 = never (but once if interrupted)

    # A resume whose run-defining fields (seed, model, data, batch sizes, optimizer) differ from
    # the checkpoint's warns and lists them; strict makes that an error.
    c.resume = ml_collections.ConfigDict(dict(strict=False))

    # log.dir: where metrics/summary/plots go ('' = output_dir; required local when output_dir is gs://).
    c.log = ml_collections.ConfigDict(dict(dir="", tensorboard=False, progress_bar=True, plot=True))

    c.eval = ml_collections.ConfigDict(
        dict(every_steps=0, num_examples=64, max_new_tokens=64, batch_size=32, at_start=True, at_end=True)
    )
    return c


class ConfigError(ValueError):
    """A bad run-config field; the message names it."""


def _fail(field: str, value, why: str):
    raise ConfigError(f"config.{field}={value!r} {why}")


def _positive(c, *fields):
    for f in fields:
        v = _get(c, f)
        if not v > 0:
            _fail(f, v, "must be positive")


def _non_negative(c, *fields):
    for f in fields:
        v = _get(c, f)
        if v < 0:
            _fail(f, v, "must be >= 0")


def _one_of(c, field, choices):
    v = _get(c, field)
    if v not in choices:
        _fail(field, v, f"is not one of {choices}")


def _get(c, dotted: str):
    node = c
    for part in dotted.split("."):
        if part not in node:
            raise ConfigError(f"config.{dotted} is missing (start configs from tooln1_jax.config.default_config())")
        node = node[part]
    return node


def _finite_floats(c, prefix: str = "") -> None:
    """Every float field, at any depth, is finite: NaN passes `v < 0` checks (every comparison is
    False), and no float in the schema means anything as inf."""
    for key, value in c.items():
        if isinstance(value, ml_collections.ConfigDict):
            _finite_floats(value, f"{prefix}{key}.")
        elif (
            isinstance(value, numbers.Real)
            and not isinstance(value, numbers.Integral)
            and not math.isfinite(float(value))
        ):
            _fail(f"{prefix}{key}", value, "must be a finite number")


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every field a run depends on; raises `ConfigError` naming the first bad one.
    Returns the config, so config files can end with `return validate_config(config)`."""
    c = config
    _finite_floats(c)
    if not isinstance(_get(c, "output_dir"), str) or not c.output_dir:
        _fail("output_dir", c.output_dir, "must be a non-empty path")
    _non_negative(c, "seed")
    _positive(c, "distributed.heartbeat_timeout_s")
    for check in (
        _check_model_and_tokenizer,
        _check_lora,
        _check_data,
        _check_mesh,
        _check_rollout,
        _check_rl,
        _check_optim_and_sft,
    ):
        check(c)
    _non_negative(c, "checkpoint.every_steps")
    _positive(c, "checkpoint.keep")
    _non_negative(c, "eval.every_steps", "eval.num_examples")
    _positive(c, "eval.max_new_tokens", "eval.batch_size")
    return config


def _check_model_and_tokenizer(c) -> None:
    for field, choices in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat", REMAT_POLICIES)):
        _one_of(c, f"model.{field}", choices)
    _one_of(c, "model.attention_impl", ATTENTION_IMPLS)
    if not c.model.name_or_path:
        r = "model.random"
        _one_of(c, f"{r}.model_type", MODEL_TYPES)
        _non_negative(c, f"{r}.vocab_size")
        sizes = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
        _positive(c, *(f"{r}.{f}" for f in (*sizes, "max_position_embeddings", "initializer_range")))
        if c.model.random.num_heads % c.model.random.num_kv_heads:
            _fail(
                f"{r}.num_heads",
                c.model.random.num_heads,
                f"must be a multiple of config.{r}.num_kv_heads={c.model.random.num_kv_heads}",
            )
        if c.model.random.head_dim % 2:
            _fail(f"{r}.head_dim", c.model.random.head_dim, "must be even (rotary embeddings)")

    _one_of(c, "tokenizer.kind", TOKENIZER_KINDS)
    if c.tokenizer.kind == "tiny":
        _positive(c, "tokenizer.vocab_size")
    if c.tokenizer.kind == "hf" and not (c.tokenizer.name_or_path or c.model.name_or_path):
        _fail(
            "tokenizer.name_or_path",
            c.tokenizer.name_or_path,
            "is empty and so is config.model.name_or_path: an hf tokenizer needs a folder or hub name",
        )


def _check_lora(c) -> None:
    _non_negative(c, "lora.rank")
    if not isinstance(_get(c, "lora.rank"), numbers.Integral):
        _fail("lora.rank", c.lora.rank, "must be an integer")
    if c.lora.rank:
        _positive(c, "lora.alpha")
    if _get(c, "lora.dropout") != 0:
        _fail("lora.dropout", c.lora.dropout, "is not implemented: only 0 (no adapter dropout) is")
    targets = _get(c, "lora.targets")
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else []
    if not names or any(t not in LORA_TARGETS for t in names) or len(set(names)) != len(names):
        _fail("lora.targets", targets, f"must be distinct comma-separated names from {','.join(LORA_TARGETS)}")


def _check_data(c) -> None:
    _one_of(c, "data.source", DATA_SOURCES)
    if c.data.source in ("xlam", "mixed") and not c.data.xlam_path:
        _fail("data.xlam_path", c.data.xlam_path, f"is empty but config.data.source={c.data.source!r} needs it")
    if c.data.source in ("toolace", "mixed") and not c.data.toolace_path:
        _fail("data.toolace_path", c.data.toolace_path, f"is empty but config.data.source={c.data.source!r} needs it")
    _positive(c, "data.max_prompt_length")
    _non_negative(c, "data.max_train_examples")
    if not 0.0 <= c.data.val_fraction < 1.0:
        _fail("data.val_fraction", c.data.val_fraction, "must be in [0, 1)")


def _check_mesh(c) -> None:
    sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
    for name, v in zip(("data", "fsdp", "tensor"), sizes):
        if v == 0 or v < -1:
            _fail(f"mesh.{name}", v, "must be positive or -1 (all remaining devices)")
    if sizes.count(-1) > 1:
        _fail("mesh", dict(data=c.mesh.data, fsdp=c.mesh.fsdp, tensor=c.mesh.tensor), "has more than one -1 size")


def _check_rollout(c) -> None:
    _positive(c, "rollout.num_samples", "rollout.max_new_tokens", "rollout.temperature", "rollout.decode_segments")
    if not 0.0 < c.rollout.top_p <= 1.0:
        _fail("rollout.top_p", c.rollout.top_p, "must be in (0, 1]")
    _non_negative(c, "rollout.top_k", "rollout.prompts_per_call")
    if c.rollout.num_samples < 2:
        _fail("rollout.num_samples", c.rollout.num_samples, "must be >= 2 (GRPO compares samples within a group)")


def _check_rl(c) -> None:
    _positive(c, "rl.train_batch_size", "rl.mini_batch_size", "rl.ppo_epochs", "rl.clip_eps")
    _non_negative(c, "rl.micro_batch_size", "rl.total_epochs", "rl.total_steps", "rl.kl_coef", "rl.entropy_coef")
    if c.rl.total_steps == 0 and c.rl.total_epochs == 0:
        _fail("rl.total_steps", 0, "and config.rl.total_epochs=0: one of them must be positive")
    if c.rl.train_batch_size % c.rl.mini_batch_size:
        _fail(
            "rl.mini_batch_size",
            c.rl.mini_batch_size,
            f"must divide config.rl.train_batch_size={c.rl.train_batch_size}",
        )
    rows = c.rl.mini_batch_size * c.rollout.num_samples
    if c.rl.micro_batch_size and rows % c.rl.micro_batch_size:
        why = f"(config.rl.mini_batch_size={c.rl.mini_batch_size} x config.rollout.num_samples={c.rollout.num_samples})"
        _fail("rl.micro_batch_size", c.rl.micro_batch_size, f"must divide the mini-batch's {rows} sequences {why}")
    _non_negative(c, "rl.rollout_batch_size")
    sampled, trained = rollout_prompts(c), c.rl.train_batch_size
    if sampled < trained or (sampled > trained and not c.rl.filter_zero_std_groups):
        why = "the surplus replaces the groups config.rl.filter_zero_std_groups=True drops, so it needs that"
        _fail("rl.rollout_batch_size", c.rl.rollout_batch_size, f"must be 0 or >= rl.train_batch_size={trained}; {why}")
    if c.rollout.prompts_per_call and sampled % c.rollout.prompts_per_call:
        _fail("rollout.prompts_per_call", c.rollout.prompts_per_call, f"must divide the {sampled} prompts per rollout")
    _one_of(c, "rl.kl_estimator", KL_ESTIMATORS)
    _one_of(c, "rl.aggregation", AGGREGATIONS)
    _one_of(c, "rl.reward_variant", REWARD_VARIANTS)


def _check_optim_and_sft(c) -> None:
    _positive(c, "optim.lr")
    _non_negative(c, "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip")
    for f in ("optim.b1", "optim.b2"):
        if not 0.0 <= _get(c, f) < 1.0:
            _fail(f, _get(c, f), "must be in [0, 1)")
    _non_negative(c, "sft.warm_start_steps", "sft.warmup_steps", "sft.max_completion_length")
    _positive(c, "sft.log_every", "sft.probe_every", "sft.probe_examples")
    if c.sft.warm_start_steps:
        _positive(c, "sft.lr", "sft.batch_size")
    band = (("stop_accuracy", 0.0, "0"), ("stop_accuracy_max", c.sft.stop_accuracy, "sft.stop_accuracy"))
    for name, low, low_text in (*band, ("stop_format_failure_max", 0.0, "0")):  # the SFT stop band
        if not low <= c.sft[name] <= 1.0:
            _fail(f"sft.{name}", c.sft[name], f"must be in [{low_text}, 1]")


def rollout_prompts(config: ml_collections.ConfigDict) -> int:
    """Prompts sampled per GRPO step: `rl.rollout_batch_size`, 0 meaning `rl.train_batch_size`."""
    return int(config.rl.rollout_batch_size or config.rl.train_batch_size)


def total_rl_steps(config: ml_collections.ConfigDict, num_train: int) -> int:
    """Rollout batches in the run: `rl.total_steps`, or `rl.total_epochs` passes over
    `num_train` prompts (whole rollout batches only)."""
    if config.rl.total_steps:
        return int(config.rl.total_steps)
    per_epoch = num_train // rollout_prompts(config)
    if per_epoch == 0:
        raise ConfigError(f"the {rollout_prompts(config)} prompts per rollout exceed the {num_train} training prompts")
    return int(config.rl.total_epochs * per_epoch)


def settings_from(cls, section: ml_collections.ConfigDict, **overrides):
    """A settings dataclass (`LossSettings`, `OptimizerSettings`, `ModelConfig`) from the fields of
    a config section that share its field names, then `overrides`: one naming rule instead of a
    hand-written copy per field."""
    names = {f.name for f in dataclasses.fields(cls)} & set(section.keys())
    return cls(**{**{name: section[name] for name in names}, **overrides})


def loss_settings(config: ml_collections.ConfigDict) -> LossSettings:
    """The GRPO loss settings of `config.rl`."""
    return settings_from(LossSettings, config.rl)


def lora_settings(config: ml_collections.ConfigDict) -> LoraSettings:
    """The LoRA settings of `config.lora` (rank 0: LoRA off)."""
    targets = tuple(t.strip() for t in config.lora.targets.split(","))
    return settings_from(LoraSettings, config.lora, targets=targets)


def optimizer_settings(config: ml_collections.ConfigDict) -> OptimizerSettings:
    """The GRPO optimizer of `config.optim`."""
    return settings_from(OptimizerSettings, config.optim)


def sft_optimizer_settings(config: ml_collections.ConfigDict) -> OptimizerSettings:
    """The SFT optimizer: `config.sft`'s rate and warmup, the rest as `config.optim`."""
    return settings_from(OptimizerSettings, config.optim, lr=config.sft.lr, warmup_steps=config.sft.warmup_steps)
