"""Checkpoints: a killed run resumed from its latest checkpoint equals the uninterrupted run
(metrics and parameters); a NaN loss stops the run and keeps the last good checkpoint; a
checkpoint exports to an HF folder that loads."""

import json
import math
import os

import jax
import numpy as np
import pytest

import tooln1_jax.train as train_lib
from tooln1_jax import checkpoint as ckpt_lib
from tooln1_jax import iteration, run_setup
from tooln1_jax import metrics as metrics_lib
from tooln1_jax.config import default_config, validate_config
from tooln1_jax.optimizer import OptimizerSettings, make_optimizer
from tooln1_jax.resume import abstract_train_state
from tooln1_jax.sharding import make_mesh

# Wall-clock keys differ between runs; every other logged number must repeat exactly.
TIMING_KEYS = {"tokens_per_s", "rollout_tokens_per_s", "step_time", "rollout_time", "update_time"}


def tiny_config(output_dir, total_steps=3, every=2):
    c = default_config()
    c.output_dir = str(output_dir)
    c.data.synthetic.num_examples = 48
    c.data.synthetic.num_tools = 2
    c.data.synthetic.max_calls = 1
    c.rl.train_batch_size = 2
    c.rl.mini_batch_size = 1  # two optimizer updates per step
    c.rl.total_steps = total_steps
    c.rollout.num_samples = 4
    c.rollout.max_new_tokens = 8
    c.rollout.temperature = 1.0
    c.optim.lr = 1e-3  # large enough that every update visibly moves the parameters
    c.eval.num_examples = 0
    c.checkpoint.every_steps = every
    c.checkpoint.keep = 3
    c.log.progress_bar = False
    c.log.plot = False
    # One device: the suite's 8 virtual CPU devices multiply the step time on a small machine,
    # and resume equality does not depend on the mesh (sharded runs: test_train_e2e.py).
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return validate_config(c)


def _rows(run_dir):
    return [
        {k: v for k, v in r.items() if k not in TIMING_KEYS}
        for r in metrics_lib.read_jsonl(os.path.join(run_dir, metrics_lib.METRICS_FILE))
    ]


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    summary = train_lib.train(tiny_config(run_dir))
    return run_dir, summary


def test_resume_after_kill_equals_uninterrupted_run(uninterrupted, tmp_path, monkeypatch):
    ref_dir, ref_summary = uninterrupted
    run_dir = tmp_path / "killed"
    real_log_step = metrics_lib.MetricsLogger.log_step

    def log_then_die(self, step, metrics):  # the process dies after logging step 3, before its checkpoint
        row = real_log_step(self, step, metrics)
        if step == 3:
            raise Killed()
        return row

    monkeypatch.setattr(metrics_lib.MetricsLogger, "log_step", log_then_die)
    with pytest.raises(Killed):
        train_lib.train(tiny_config(run_dir))
    monkeypatch.setattr(metrics_lib.MetricsLogger, "log_step", real_log_step)
    assert ckpt_lib.RunCheckpointer(str(run_dir)).all_steps() == [2]
    assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3]  # step 3 was logged, then lost

    resumed = train_lib.train(tiny_config(run_dir))  # a fresh start on the same output_dir
    assert resumed["num_updates"] == ref_summary["num_updates"] == 6
    assert _rows(run_dir) == _rows(ref_dir)
    _assert_trees_equal(resumed["params"], ref_summary["params"])
    # The parameters really moved, so equality above is not trivial.
    first = jax.tree.leaves(
        run_setup.build_model(
            tiny_config(run_dir), run_setup.build_tokenizer(tiny_config(run_dir)), make_mesh(1, 1, 1)
        )[1]
    )
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, jax.tree.leaves(resumed["params"]))
    )


def test_checkpoint_holds_data_position_and_keeps_last_k(uninterrupted):
    run_dir, summary = uninterrupted
    checkpointer = ckpt_lib.RunCheckpointer(str(run_dir), keep=3)
    assert checkpointer.all_steps() == [2, 3]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), summary["params"])
    params, _, meta = checkpointer.restore(abstract, _opt_like(summary), 3)
    checkpointer.close()
    _assert_trees_equal(params, summary["params"])
    assert meta["step"] == 3 and meta["num_updates"] == 6
    # 43 training prompts // 2 per batch = 21 batches per epoch: step 3 starts at index 6 of epoch 0.
    assert meta["data_position"] == {"epoch": 0, "index": 6}
    assert meta["config"]["rl"]["total_steps"] == 3


def _opt_like(summary):
    cfg = tiny_config("/unused")
    model_config = run_setup.build_model(cfg, run_setup.build_tokenizer(cfg), make_mesh(1, 1, 1), load_weights=False)[0]
    optimizer = make_optimizer(OptimizerSettings(1e-3))
    return abstract_train_state(model_config, optimizer, make_mesh(1, 1, 1), np.float32).opt_state


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = iteration.group_advantages

    def poisoned(rewards, group_size, **kw):  # the second rollout's advantages are NaN
        calls["n"] += 1
        adv = real(rewards, group_size, **kw)
        return adv * float("nan") if calls["n"] == 2 else adv

    monkeypatch.setattr(iteration, "group_advantages", poisoned)
    cfg = tiny_config(tmp_path, total_steps=3, every=1)
    with pytest.raises(iteration.NonFiniteLossError, match="non-finite loss"):
        train_lib.train(cfg)
    checkpointer = ckpt_lib.RunCheckpointer(str(tmp_path))
    assert checkpointer.all_steps() == [1]
    checkpointer.close()
    assert [r["step"] for r in metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))] == [1]
    out = ckpt_lib.export_hf(str(tmp_path), str(tmp_path / "hf"))
    from tooln1_jax.models.hf_io import load_pretrained

    _, params = load_pretrained(out)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_export_hf_loads_in_transformers(uninterrupted, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    run_dir, summary = uninterrupted
    out = ckpt_lib.export_hf(str(run_dir), str(tmp_path / "hf"))
    from tooln1_jax.models.hf_io import load_pretrained

    model_config, params = load_pretrained(out)
    _assert_trees_equal(params, summary["params"])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.vocab_size == model_config.vocab_size
    ids = np.array([[5, 6, 7, 8]], np.int32)
    from tooln1_jax.models import logits

    ours = np.asarray(logits(model_config, params, ids))
    with torch.no_grad():
        theirs = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=2e-4)
    with open(os.path.join(run_dir, "summary.json")) as f:
        assert json.load(f)["steps_done"] == 3
    assert not math.isnan(summary["final"]["loss"])


def test_bucket_output_dir_keeps_urls_and_logs_locally():
    """On a pod, checkpoints go to a shared gs:// output_dir (orbax writes URLs itself) while
    metrics and summaries go to a local folder; no URL is turned into a local path."""
    from tooln1_jax.config import default_config
    from tooln1_jax.run_setup import log_directory

    assert ckpt_lib.reference_dir("gs://bucket/runs/7b") == "gs://bucket/runs/7b/reference"
    assert ckpt_lib._resolve("gs://bucket/runs/7b/checkpoints") == "gs://bucket/runs/7b/checkpoints"
    assert os.path.isabs(ckpt_lib.reference_dir("runs/local"))
    config = default_config()
    config.output_dir = "gs://bucket/runs/7b/"
    assert log_directory(config) == os.path.join("runs", "7b")
    config.log.dir = "/tmp/logs"
    assert log_directory(config) == "/tmp/logs"
    config.output_dir, config.log.dir = "runs/local", ""
    assert log_directory(config) == "runs/local"


# ---------------------------------------------------------------- damaged checkpoints

SMALL = {"w": np.arange(1000, dtype=np.float32), "b": np.ones(3, np.float32)}
SMALL_OPT = {"mu": np.zeros(5, np.float32)}


def _two_checkpoints(root):
    checkpointer = ckpt_lib.RunCheckpointer(str(root), keep=3)
    for step in (1, 2):
        checkpointer.save(step, jax.tree.map(lambda x, k=step: x * k, SMALL), SMALL_OPT, {"step": step})
    checkpointer.close()
    return ckpt_lib.RunCheckpointer(str(root), keep=3)


def _truncate_params(step_dir):
    """Halves the largest data file under the params folder (a host died mid-copy)."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "params")) for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)


def _empty_meta(step_dir):
    open(os.path.join(step_dir, "meta", "metadata"), "w").close()


@pytest.mark.parametrize("damage", [_truncate_params, _empty_meta], ids=["truncated_params", "empty_meta"])
def test_restore_skips_a_damaged_latest_checkpoint(tmp_path, damage):
    checkpointer = _two_checkpoints(tmp_path)
    latest = checkpointer.step_dir(2)
    damage(latest)
    with pytest.warns(RuntimeWarning, match=f"{latest}: .*(OUT_OF_RANGE|JSONDecodeError).*skipped") as record:
        step, params, opt_state, meta = checkpointer.restore_latest_readable(SMALL, SMALL_OPT)
    assert len(record) == 1
    assert step == 1 and meta == {"step": 1}
    _assert_trees_equal(params, SMALL)
    assert os.path.isdir(latest) and checkpointer.all_steps() == [1, 2]  # left on disk
    with pytest.warns(RuntimeWarning, match="skipped"):
        params, _, meta = checkpointer.restore(SMALL, SMALL_OPT)  # the old signature, no step
    assert meta == {"step": 1}
    with pytest.raises(ckpt_lib.CheckpointReadError, match=f"cannot read checkpoint {latest}: "):
        checkpointer.restore(SMALL, SMALL_OPT, 2)  # asked for explicitly: a one-line reason
    # The resumed run reaches step 2 again: the damaged one is replaced, not a StepAlreadyExists crash.
    with pytest.warns(RuntimeWarning, match="replacing unreadable checkpoint"):
        checkpointer.save(2, jax.tree.map(lambda x: x * 2, SMALL), SMALL_OPT, {"step": 2})
    checkpointer.manager.wait_until_finished()
    step, params, _, _ = checkpointer.restore_latest_readable(SMALL, SMALL_OPT)
    assert step == 2
    _assert_trees_equal(params, jax.tree.map(lambda x: x * 2, SMALL))
    checkpointer.close()


def test_restore_with_every_checkpoint_damaged_names_them(tmp_path):
    checkpointer = _two_checkpoints(tmp_path)
    _truncate_params(checkpointer.step_dir(2))
    _empty_meta(checkpointer.step_dir(1))
    with pytest.warns(RuntimeWarning), pytest.raises(ckpt_lib.CheckpointReadError) as info:
        checkpointer.restore_latest_readable(SMALL, SMALL_OPT)
    message = str(info.value)
    assert message.startswith(f"no readable checkpoint under {checkpointer.directory}")
    assert f"{checkpointer.step_dir(2)}: ValueError: OUT_OF_RANGE" in message
    assert f"{checkpointer.step_dir(1)}: JSONDecodeError" in message
    assert len(message.splitlines()) == 3  # one line per checkpoint, not orbax's tensorstore spec
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        ckpt_lib.RunCheckpointer(str(tmp_path / "empty")).restore_latest_readable(SMALL, SMALL_OPT)
    checkpointer.close()


def test_a_run_resumes_past_a_damaged_latest_checkpoint(uninterrupted, tmp_path, capsys):
    """A real run's newest checkpoint truncated on disk: the same command resumes from the one
    before it (with a warning, the damaged folder left in place) and ends like the uninterrupted run."""
    import shutil

    ref_dir, ref_summary = uninterrupted
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    checkpointer = ckpt_lib.RunCheckpointer(str(run_dir))
    assert checkpointer.all_steps() == [2, 3]
    _truncate_params(checkpointer.step_dir(3))
    checkpointer.close()
    with pytest.warns(RuntimeWarning, match=r"cannot read checkpoint .*/3: .*skipped"):
        resumed = train_lib.train(tiny_config(run_dir))
    assert "(step 2 of 3)" in capsys.readouterr().out
    assert _rows(run_dir) == _rows(ref_dir)
    _assert_trees_equal(resumed["params"], ref_summary["params"])
