"""Run configs: every file under configs/ loads and validates, the paper configs hold the paper's
hyperparameters, bad fields fail at start naming the field, and CLI overrides apply."""

import glob
import importlib.util
import os

import pytest
from absl.flags import IllegalFlagValueError

from tooln1_jax.cli import parse_config_args
from tooln1_jax.config import ConfigError, default_config, rollout_prompts, total_rl_steps, validate_config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")) if not p.endswith("__init__.py"))


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_config_files_exist():
    names = {os.path.basename(p) for p in CONFIG_FILES}
    assert {"tool_n1_qwen2_5_7b.py", "tool_n1_qwen2_5_14b.py", "smollm2_135m_cpu.py"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_loads_and_validates(path):
    config = load(path)
    assert validate_config(config) is config
    assert set(default_config().keys()) <= set(config.keys())


@pytest.mark.parametrize("name", ["tool_n1_qwen2_5_7b.py", "tool_n1_qwen2_5_14b.py"])
def test_paper_configs_hold_the_paper_hyperparameters(name):
    c = load(os.path.join(CONFIG_DIR, name))
    assert c.data.source == "mixed" and c.data.max_prompt_length == 4096
    assert (
        c.rollout.num_samples,
        c.rollout.max_new_tokens,
        c.rollout.temperature,
        c.rollout.top_p,
        c.rollout.top_k,
    ) == (5, 8192, 0.7, 1.0, 0)
    assert (c.rl.train_batch_size, c.rl.mini_batch_size, c.rl.ppo_epochs, c.rl.total_epochs) == (1024, 256, 1, 7)
    assert (c.rl.clip_eps, c.rl.kl_coef, c.rl.kl_estimator, c.rl.entropy_coef) == (0.2, 1e-3, "k3", 0.0)
    assert (c.rl.aggregation, c.rl.reward_variant, c.rl.unbiased_std) == ("token_mean", "binary", True)
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay, c.optim.b1, c.optim.b2, c.optim.grad_clip) == (
        1e-6,
        0,
        0.01,
        0.9,
        0.999,
        1.0,
    )
    assert c.sft.warm_start_steps == 0 and c.model.dtype == "bfloat16" and c.model.remat == "full"
    assert ("7B" in c.model.name_or_path) == ("7b" in name)
    # 62.7k training prompts / 1,024 per rollout = 61 rollouts per epoch, 4 updates each.
    assert total_rl_steps(c, 62_688) == 7 * 61


BAD_FIELDS = [
    (
        ("rl", "train_batch_size", 1024),
        ("rl", "mini_batch_size", 300),
        "config.rl.mini_batch_size=300 must divide config.rl.train_batch_size=1024",
    ),
    (None, ("rl", "kl_estimator", "k4"), "config.rl.kl_estimator='k4' is not one of"),
    (None, ("rl", "aggregation", "sum"), "config.rl.aggregation='sum' is not one of"),
    (None, ("rl", "reward_variant", "partial"), "config.rl.reward_variant='partial'"),
    (None, ("data", "source", "bfcl"), "config.data.source='bfcl'"),
    (None, ("optim", "lr", -1e-6), "config.optim.lr=-1e-06 must be positive"),
    (None, ("rollout", "top_p", 0.0), "config.rollout.top_p=0.0 must be in (0, 1]"),
    (None, ("rollout", "num_samples", 1), "config.rollout.num_samples=1 must be >= 2"),
    (None, ("rollout", "temperature", 0.0), "config.rollout.temperature=0.0 must be positive"),
    (None, ("rollout", "decode_segments", 0), "config.rollout.decode_segments=0 must be positive"),
    (None, ("rl", "micro_batch_size", 3), "config.rl.micro_batch_size=3 must divide the mini-batch's 20 sequences"),
    (None, ("mesh", "fsdp", 0), "config.mesh.fsdp=0 must be positive or -1"),
    (("mesh", "data", -1), ("mesh", "fsdp", -1), "has more than one -1 size"),
    (None, ("model", "remat", "some"), "config.model.remat='some'"),
    (
        None,
        ("rollout", "prompts_per_call", 3),
        "config.rollout.prompts_per_call=3 must divide the 8 prompts per rollout",
    ),
    (
        None,
        ("model.random", "num_kv_heads", 3),
        "config.model.random.num_heads=4 must be a multiple of config.model.random.num_kv_heads=3",
    ),
    (None, ("data", "val_fraction", 1.0), "config.data.val_fraction=1.0 must be in [0, 1)"),
    (None, ("checkpoint", "keep", 0), "config.checkpoint.keep=0 must be positive"),
    (None, ("sft", "stop_accuracy", 1.5), "config.sft.stop_accuracy=1.5 must be in [0, 1]"),
    (None, ("sft", "probe_every", 0), "config.sft.probe_every=0 must be positive"),
    (("sft", "stop_accuracy", 0.3), ("sft", "stop_accuracy_max", 0.2), "config.sft.stop_accuracy_max=0.2 must be in"),
    (None, ("sft", "stop_format_failure_max", -0.1), "config.sft.stop_format_failure_max=-0.1 must be in [0, 1]"),
    (("data", "source", "mixed"), ("data", "toolace_path", ""), "config.data.toolace_path='' is empty"),
    (("rl", "total_steps", 0), ("rl", "total_epochs", 0), "config.rl.total_steps=0 and config.rl.total_epochs=0"),
    (None, ("rl", "rollout_batch_size", 4), "config.rl.rollout_batch_size=4 must be 0 or >= rl.train_batch_size=8"),
    (
        None,
        ("rl", "rollout_batch_size", 16),
        "config.rl.rollout_batch_size=16 must be 0 or >= rl.train_batch_size=8; "
        "the surplus replaces the groups config.rl.filter_zero_std_groups=True drops",
    ),
]


def _set(config, section, field, value):
    node = config
    for part in section.split("."):
        node = node[part]
    node[field] = value


@pytest.mark.parametrize("first,change,message", BAD_FIELDS, ids=[b[1][0] + "." + b[1][1] for b in BAD_FIELDS])
def test_bad_field_fails_naming_it(first, change, message):
    config = default_config()
    if first:
        _set(config, *first)
    _set(config, *change)
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    assert message in str(err.value)


def test_rollout_surplus_comes_with_the_group_filter():
    config = default_config()
    config.rl.rollout_batch_size, config.rl.filter_zero_std_groups = 12, True  # 12 sampled, up to 8 trained
    assert rollout_prompts(validate_config(config)) == 12
    config.rl.rollout_batch_size = 0
    assert rollout_prompts(validate_config(config)) == config.rl.train_batch_size


FLOAT_FIELDS = [
    "rl.kl_coef",
    "rl.clip_eps",
    "rl.entropy_coef",
    "optim.lr",
    "optim.weight_decay",
    "optim.b1",
    "optim.b2",
    "optim.grad_clip",
    "rollout.temperature",
    "rollout.top_p",
    "sft.lr",
    "sft.stop_accuracy",
    "sft.stop_accuracy_max",
    "sft.stop_format_failure_max",
    "data.val_fraction",
    "model.random.rope_theta",
    "model.random.initializer_range",
    "lora.alpha",
    "lora.dropout",
]


def test_every_float_field_is_a_float():
    """So FLOAT_FIELDS is not stale: each is a float in the schema, and no float field is left out."""

    def floats(node, prefix=""):
        for key, value in node.items():
            if hasattr(value, "items"):
                yield from floats(value, f"{prefix}{key}.")
            elif isinstance(value, float):
                yield f"{prefix}{key}"

    assert sorted(floats(default_config())) == sorted(FLOAT_FIELDS)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_non_finite_float_fails_naming_it(field, value):
    path = os.path.join(CONFIG_DIR, "tool_n1_qwen2_5_7b.py")
    config = parse_config_args(["train", f"--config={path}", f"--config.{field}={value}"])
    with pytest.raises(ConfigError, match=rf"config\.{field}=-?(nan|inf) must be a finite number"):
        validate_config(config)


def test_default_config_validates():
    validate_config(default_config())


def test_cli_overrides_apply_and_are_validated():
    path = os.path.join(CONFIG_DIR, "tool_n1_qwen2_5_7b.py")
    config = parse_config_args(
        [
            "train",
            f"--config={path}",
            "--config.rl.kl_coef=0.0",
            "--config.rollout.num_samples=8",
            "--config.data.xlam_path=/data/xlam.jsonl",
        ]
    )
    assert config.rl.kl_coef == 0.0 and config.rollout.num_samples == 8 and config.data.xlam_path == "/data/xlam.jsonl"
    assert config.rl.train_batch_size == 1024  # untouched fields keep the file's values
    validate_config(config)

    bad = parse_config_args(["train", f"--config={path}", "--config.rl.mini_batch_size=300"])
    with pytest.raises(ConfigError, match="config.rl.mini_batch_size=300 must divide config.rl.train_batch_size=1024"):
        validate_config(bad)


def test_cli_rejects_unknown_fields_and_wrong_types():
    path = os.path.join(CONFIG_DIR, "tool_n1_qwen2_5_7b.py")
    with pytest.raises(Exception, match="kl_coeff"):
        parse_config_args(["train", f"--config={path}", "--config.rl.kl_coeff=0.0"])
    with pytest.raises(IllegalFlagValueError):
        parse_config_args(["train", f"--config={path}", "--config.rl.kl_coef=lots"])
