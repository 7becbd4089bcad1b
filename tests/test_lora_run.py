"""A LoRA run end to end (config.lora.rank > 0): SFT warm start and GRPO train the same adapters
on a frozen base; checkpoints hold the adapters and their optimizer state, not the base; a killed
run resumes exactly; export gives a merged HF folder and a PEFT adapter folder that peft loads
onto the transformers base with our logits."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_checkpoint import _assert_trees_equal, _rows, tiny_config  # one tiny run config for both

import tooln1_jax.train as train_lib
from tooln1_jax import checkpoint as ckpt_lib
from tooln1_jax import metrics as metrics_lib
from tooln1_jax import run_setup
from tooln1_jax.config import lora_settings, validate_config
from tooln1_jax.models import logits, save_pretrained
from tooln1_jax.models.hf_io import load_pretrained
from tooln1_jax.models.lora import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, adapter_shapes, attach
from tooln1_jax.sft import run_sft
from tooln1_jax.sharding import make_mesh


def lora_config(output_dir, total_steps=2, every=1):
    """test_checkpoint's tiny run with rank-4 LoRA on four targets and a 2-step LoRA warm start."""
    c = tiny_config(output_dir, total_steps=total_steps, every=every)
    c.optim.lr = 1e-2  # large enough that every update visibly moves the adapters
    c.sft.warm_start_steps = 2
    c.sft.batch_size = 4
    c.sft.lr = 1e-2
    c.sft.max_completion_length = 64
    c.lora.rank, c.lora.alpha, c.lora.targets = 4, 8.0, "q,v,o,down"
    c.lora.train_norms = True  # the norms train whole too, and travel in checkpoints and PEFT's folder
    return validate_config(c)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora_run")
    summary = train_lib.train(lora_config(run_dir))
    setup = run_setup.setup_run(lora_config(run_dir))
    return run_dir, summary, setup.model_config, setup.params, setup


class Killed(Exception):
    pass


def test_checkpoints_hold_the_adapters_and_their_optimizer_state_not_the_base(run):
    run_dir, summary, model_config, base, _ = run
    lora = lora_settings(lora_config(run_dir))
    assert summary["sft"]["sft_steps"] == 2 and summary["num_updates"] == 4
    assert not os.path.exists(os.path.join(run_dir, "reference"))  # the base is the reference
    step_dir = os.path.join(run_dir, "checkpoints", "2")
    saved = {
        item: ocp.StandardCheckpointer().metadata(os.path.join(step_dir, item)).item_metadata.tree
        for item in ("params", "opt_state")
    }
    shapes = jax.tree.map(tuple, adapter_shapes(model_config, lora), is_leaf=lambda x: isinstance(x, tuple))
    assert jax.tree.map(lambda m: tuple(m.shape), saved["params"]) == shapes
    adam = saved["opt_state"][1][0]  # (clipping, (adam, ...)): Adam's moments are adapter-shaped
    assert (
        jax.tree.map(lambda m: tuple(m.shape), adam["mu"])
        == shapes
        == jax.tree.map(lambda m: tuple(m.shape), adam["nu"])
    )
    _, _, adapters, _ = ckpt_lib.restore_trained(str(run_dir), mesh=make_mesh(1, 1, 1))
    _assert_trees_equal(adapters, summary["adapters"])
    assert np.abs(np.asarray(adapters["layers"]["down_proj"]["b"])).max() > 1e-3  # trained off zero


def test_resume_after_kill_equals_uninterrupted_run(run, tmp_path, monkeypatch):
    ref_dir, ref_summary, _, _, _ = run
    run_dir = tmp_path / "killed"
    real_log_step = metrics_lib.MetricsLogger.log_step

    def log_then_die(self, step, metrics):  # dies after logging step 2, before its checkpoint
        row = real_log_step(self, step, metrics)
        if step == 2:
            raise Killed()
        return row

    monkeypatch.setattr(metrics_lib.MetricsLogger, "log_step", log_then_die)
    with pytest.raises(Killed):
        train_lib.train(lora_config(run_dir))
    monkeypatch.setattr(metrics_lib.MetricsLogger, "log_step", real_log_step)
    assert ckpt_lib.RunCheckpointer(str(run_dir)).all_steps() == [1]
    resumed = train_lib.train(lora_config(run_dir))
    assert resumed["num_updates"] == 4
    assert _rows(run_dir) == _rows(ref_dir)
    _assert_trees_equal(resumed["adapters"], ref_summary["adapters"])
    _assert_trees_equal(resumed["params"], ref_summary["params"])


def test_sft_with_lora_trains_the_adapters_and_leaves_the_base(run):
    run_dir, _, model_config, base, setup = run
    config = lora_config(run_dir)
    before = jax.tree.map(np.asarray, base)
    # the run's examples and optimizer settings: the warm start's compiled step is reused
    adapters, metrics = run_sft(
        config, model_config, base, setup.tokenizer, setup.train_records, steps=2, mesh=setup.mesh
    )
    _assert_trees_equal(base, before)
    assert jax.tree.structure(adapters) == jax.tree.structure(
        adapter_shapes(model_config, lora_settings(config)), is_leaf=lambda x: isinstance(x, tuple)
    )
    assert metrics["sft_steps"] == 2 and np.abs(np.asarray(adapters["layers"]["q_proj"]["b"])).max() > 1e-3


def test_export_merged_hf_and_a_peft_adapter_that_peft_loads_with_our_logits(run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, summary, model_config, base, _ = run
    lora = lora_settings(lora_config(run_dir))
    merged_dir = ckpt_lib.export_hf(str(run_dir), str(tmp_path / "merged"), mesh=make_mesh(1, 1, 1))
    _, merged = load_pretrained(merged_dir)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(summary["params"])):  # the run's own merge
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-7)

    adapter_dir = ckpt_lib.export_peft(str(run_dir), str(tmp_path / "adapter"))
    assert sorted(os.listdir(adapter_dir)) == [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]
    with open(os.path.join(adapter_dir, PEFT_CONFIG_FILE)) as f:
        peft_config = json.load(f)
    assert peft_config["target_modules"] == ["down_proj", "o_proj", "q_proj", "v_proj"]
    assert peft_config["modules_to_save"] == ["input_layernorm", "norm", "post_attention_layernorm"]
    trained_norm = np.asarray(summary["adapters"]["norms"]["final_norm"])
    assert np.abs(trained_norm - np.asarray(base["final_norm"])).max() > 1e-3  # the norms trained
    base_dir = save_pretrained(model_config, base, tmp_path / "base")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
    ids = np.array([[5, 6, 7, 8, 9, 10]], np.int32)
    ours = np.asarray(logits(model_config, attach(base, summary["adapters"], lora), ids))
    with torch.no_grad():
        theirs = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        with model.disable_adapter():
            without = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - without).max() > 1e-3  # the adapters change the logits
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=2e-4)
