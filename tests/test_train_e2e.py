"""A few-step end-to-end GRPO run of the demo config inside the suite, sharded over a (data 2,
fsdp 2) mesh of the suite's virtual devices: SFT warm start, rollouts, updates, held-out eval,
logs and the reward curve."""

import importlib.util
import json
import math
import os

import numpy as np

import tooln1_jax.train as train_lib
from tooln1_jax import rollouts, run_setup
from tooln1_jax.config import default_config, validate_config
from tooln1_jax.metrics import read_jsonl
from tooln1_jax.sharding import make_mesh

# Per-step metric keys that every metrics.jsonl row carries.
STEP_METRICS = (
    "reward_mean",
    "reward_std",
    "accuracy",
    "format_failure_rate",
    "zero_std_group_frac",
    "unsolved_group_frac",
    "trained_groups",
    "response_length",
    "response_length_max",
    "truncated_frac",
    "loss",
    "policy_loss",
    "kl",
    "entropy",
    "clip_frac",
    "clip_frac_low",
    "clip_frac_high",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "first_ratio_max_dev",
    "grad_norm",
    "lr",
    "data_epoch",
    "num_updates",
    "tokens_per_s",
    "rollout_tokens_per_s",
    "step_time",
    "rollout_time",
    "update_time",
    "think_frac",
    "think_chars",
)

TINY_CPU = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_cpu.py")


def demo_config(output_dir):
    if os.path.exists(TINY_CPU):  # the demo's config, shrunk below
        spec = importlib.util.spec_from_file_location("tiny_cpu", TINY_CPU)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        c = module.get_config()
    else:  # the schema's defaults are already a tiny random model on synthetic tasks
        c = default_config()
    c.output_dir = str(output_dir)
    # The demo's pipeline at test size: a 2-step warm start, 2 GRPO steps of 2 updates each.
    c.data.synthetic.num_examples = 40
    c.data.max_prompt_length = 256  # keep every held-out prompt: the counts below are exact
    c.sft.warm_start_steps = 2
    c.sft.batch_size = 8
    c.sft.stop_accuracy, c.sft.stop_accuracy_max = 1.0, 1.0  # probed, never stops early
    c.sft.probe_every, c.sft.probe_examples = 1, 4
    c.data.val_fraction = 0.25  # 10 held-out records: 4 evaluated, 4 probed
    c.data.synthetic.phrasing = "seen"  # and an out-of-distribution set in the held-out wording
    if "max_completion_length" not in c.sft:  # SFT targets are longer than the test's rollouts
        c.sft.max_completion_length = 96
    c.rl.train_batch_size = 4
    c.rl.rollout_batch_size, c.rl.filter_zero_std_groups = 0, False  # every group trains
    c.rl.mini_batch_size = 2
    c.rl.micro_batch_size = 0
    c.rl.total_steps = 2
    c.rollout.num_samples = 4
    c.rollout.max_new_tokens = 16
    c.eval.at_start = True
    c.eval.every_steps = 0
    c.eval.num_examples = 4
    c.eval.batch_size = 4
    c.eval.max_new_tokens = 16
    c.checkpoint.every_steps = 0
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 1  # data and FSDP sharding, on 4 of the 8 devices
    c.log.tensorboard = True
    c.log.progress_bar = True
    c.log.plot = True
    return validate_config(c)


def test_demo_config_runs_end_to_end(tmp_path):
    config = demo_config(tmp_path)
    summary = train_lib.train(config)  # the Python API

    rows = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        missing = set(STEP_METRICS) - set(row)
        assert not missing, f"metrics.jsonl lacks {sorted(missing)}"
        for key in STEP_METRICS:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (key, row[key])
        assert 0.0 <= row["reward_mean"] <= 1.0 and 0.0 <= row["format_failure_rate"] <= 1.0
        assert row["kl"] >= 0.0 and row["entropy"] > 0.0 and row["response_length"] > 0
        # On-policy: the first update after a rollout recomputes the sampler's log-probs.
        assert row["first_ratio_max_dev"] < 1e-5
    assert rows[-1]["num_updates"] == 4

    evals = read_jsonl(os.path.join(tmp_path, "eval.jsonl"))
    assert [e["step"] for e in evals] == [0, 2]
    assert all(0.0 <= e["accuracy"] <= 1.0 and e["num_scored"] == 4 for e in evals)
    assert all(0.0 <= e["ood_accuracy"] <= 1.0 and e["ood_num_scored"] == 4 for e in evals)
    assert summary["accuracy_start"] == evals[0]["accuracy"] and summary["accuracy_end"] == evals[1]["accuracy"]
    assert summary["sft"]["sft_steps"] == 2
    assert [p["sft_steps"] for p in summary["sft"]["sft_probes"]] == [1]  # none at the cap
    assert not summary["sft"]["sft_stopped_by_probe"] and not summary["sft"]["sft_stopped_in_band"]

    png = os.path.join(tmp_path, "reward_curve.png")
    assert summary["curve_png"] == png
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(os.path.join(tmp_path, "tensorboard"))
    with open(os.path.join(tmp_path, "summary.json")) as f:
        saved = json.load(f)
    assert saved["steps_done"] == 2 and saved["num_updates"] == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(summary["params"]))


def test_group_filter_trains_only_the_groups_with_reward_spread(tmp_path):
    """DAPO's dynamic sampling end to end: 8 prompts sampled per step, at most 4 groups trained,
    only those whose rewards differ, in mini-batches of 2 groups (the last one may be short)."""
    config = demo_config(tmp_path)
    config.rl.rollout_batch_size, config.rl.filter_zero_std_groups = 8, True
    config.eval.at_start = config.eval.at_end = False
    train_lib.train(config)
    rows = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    updates = 0
    for row in rows:
        spread = round((1.0 - row["zero_std_group_frac"]) * 8)
        assert 0.0 <= row["unsolved_group_frac"] <= row["zero_std_group_frac"]
        assert row["trained_groups"] == min(4, spread)
        updates += -(-row["trained_groups"] // 2)
        assert row["num_updates"] == updates and math.isfinite(row["loss"])


def test_rollout_batch_layout_and_on_policy_logprobs():
    """The rollout rows line up with what the update recomputes: prompt left-padded, completion
    after it, masks consistent, and the sampler's log-probs equal recomputed ones (ratio 1)."""
    import jax

    from tooln1_jax import rewards, rollouts
    from tooln1_jax.data.prompt import encode_prompts
    from tooln1_jax.train_step import compute_logprobs

    config = default_config()
    config.data.synthetic.num_examples = 6
    config.data.synthetic.num_tools = 2
    tokenizer = run_setup.build_tokenizer(config)
    model_config, params = run_setup.build_model(config, tokenizer, make_mesh(1, 1, 1))
    records, _ = run_setup.load_records(config)
    prompt_ids, kept, _ = encode_prompts(tokenizer, records[:2], max_prompt_length=1024)
    n, new, temperature = 3, 8, 0.7
    batch = rollouts.generate_and_score(
        model_config,
        params,
        tokenizer,
        prompt_ids,
        kept,
        num_samples=n,
        max_new_tokens=new,
        temperature=temperature,
        rng=jax.random.key(1),
        prompts_per_call=1,
    )  # one sampler call per prompt, rows concatenated
    width = batch.prompt_width
    assert batch.input_ids.shape == (2 * n, width + new) and batch.num_rows == 2 * n
    for row in range(2 * n):
        prompt = prompt_ids[row // n]
        np.testing.assert_array_equal(batch.input_ids[row, width - len(prompt) : width], prompt)
        assert batch.attention_mask[row, :width].sum() == len(prompt)
        length = batch.lengths[row]
        assert batch.loss_mask[row].sum() == length and batch.loss_mask[row, :width].sum() == 0
        np.testing.assert_array_equal(batch.attention_mask[row, width:], batch.loss_mask[row, width:])
        tokens = batch.input_ids[row, width : width + length].tolist()
        if batch.stopped[row]:
            tokens = tokens[:-1]
        assert batch.completions[row] == tokenizer.decode(tokens, skip_special_tokens=False)
    want, reasons = rewards.batch_rewards(batch.completions, [r.answer for r in kept for _ in range(n)], "binary")
    np.testing.assert_array_equal(batch.rewards, want)
    assert batch.reasons == reasons

    recomputed = np.asarray(
        compute_logprobs(
            model_config, params, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}, temperature
        )
    )
    on = batch.loss_mask == 1
    assert on.sum() > 2 * n
    assert np.max(np.abs(np.exp(recomputed[on] - batch.old_logprobs[on]) - 1.0)) < 1e-5


def test_group_coverage_counts_unsolved_mixed_and_solved_groups():
    """What the per-step `unsolved_group_frac` reads: 4 groups of 4 samples, rows grouped by prompt."""
    correct = np.array([0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0], np.float32)
    assert rollouts.group_coverage(correct, 4) == {"unsolved_frac": 0.5, "mixed_frac": 0.25, "solved_frac": 0.25}
