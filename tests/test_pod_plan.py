"""The pod plan's arithmetic (tpu_scripts/plan.py) and its document (docs/pod_plan.md): each
named plan fits its slice by its own numbers, the counter-example does not, the sharding and
FLOP figures match an independent hand computation, and the document shows exactly what the
script prints."""

import dataclasses
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tpu_scripts"))

import plan as P  # noqa: E402

GiB = 2**30
Q7, Q14 = "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-14B-Instruct"


@pytest.fixture(scope="module")
def reports():
    return {p.name: P.plan_report(p) for p in P.PLANS + (P.COUNTER_EXAMPLE,) + P.LORA_PLANS}


def test_the_paper_models_have_a_plan_on_named_slices():
    named = {(p.model, p.accelerator) for p in P.PLANS}
    assert (Q7, "v5p-64") in named and (Q14, "v5p-128") in named


@pytest.mark.parametrize("name", [p.name for p in P.PLANS])
def test_each_plan_fits_its_slice(reports, name):
    r = reports[name]
    assert r.fits
    assert max(r.update_peak, r.rollout_peak) <= 0.9 * r.chip.hbm_bytes
    # the generation batch is not wastefully small: twice as many prompts per pass would not fit
    assert P.largest_generation_prompts(r.plan) == r.plan.generation_prompts
    if r.plan.generation_prompts < P.CEILING.prompts:
        bigger = P.plan_report(
            dataclasses.replace(r.plan, generation_prompts=2 * r.plan.generation_prompts), scenarios=()
        )
        assert not bigger.fits


def test_one_pass_plans_exist_for_the_trainer_as_it_samples_today(reports):
    # the trainer samples all 1,024 prompts of a step in one call
    one_pass = {r.plan.model for r in reports.values() if r.fits and r.plan.generation_prompts == P.CEILING.prompts}
    assert one_pass == {Q7, Q14}


def test_the_counter_example_does_not_fit(reports):
    r = reports[P.COUNTER_EXAMPLE.name]
    assert not r.fits
    # the training state alone (params, AdamW, reference, gradients) is past the 16 GB chip
    held_and_grads = sum(r.persistent.values()) + r.update["gradients (fp32 accumulator + micro-batch)"]
    assert held_and_grads > r.budget_bytes
    assert P.largest_generation_prompts(r.plan) == 0


def test_a_mesh_that_does_not_match_the_slice_is_refused():
    bad = dataclasses.replace(P.PLANS[0], mesh=(1, 8, 8))
    with pytest.raises(ValueError, match="has 64 devices, v5p-64 has 32 chips"):
        P.plan_report(bad)


def test_sharded_state_matches_a_hand_count_for_7b_on_fsdp8_tensor4():
    """Big matrices split 32 ways, biases over tensor only, norms replicated (the rules' logical
    axes: vocab/heads/mlp -> tensor, embed -> fsdp, layers/norm -> none)."""
    cfg = P.preset(Q7)
    d, f, v, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    matrices = 2 * v * d + L * (d * q + 2 * d * kv + q * d + 3 * d * f)
    biases = L * (q + 2 * kv)
    norms = 2 * L * d + d
    assert matrices + biases + norms == cfg.num_params == 7_615_616_512
    mesh = P.abstract_mesh((1, 8, 4))
    expected = (matrices / 32 + biases / 4 + norms) * 4
    assert P.param_bytes_per_chip(cfg, mesh, P.TRAIN_RULES, 4) == pytest.approx(expected, rel=1e-12)
    # rollout weights: tensor-parallel only (replicated over fsdp)
    expected_sample = (matrices / 4 + biases / 4 + norms) * 2
    assert P.param_bytes_per_chip(cfg, mesh, P.SAMPLE_RULES, 2) == pytest.approx(expected_sample, rel=1e-12)


def test_kv_cache_per_layer_formula_and_the_kv_head_divisibility_rule():
    cfg = P.preset(Q7)
    one_sequence = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 12_288 * 2  # K and V, bf16
    assert one_sequence == 704_643_072
    assert P.kv_cache_bytes_per_chip(cfg, P.abstract_mesh((1, 1, 1)), 1, 12_288) == one_sequence
    # 1,280 rows over 8 batch shards, 4 KV heads over tensor=4
    assert P.kv_cache_bytes_per_chip(cfg, P.abstract_mesh((1, 8, 4)), 1280, 12_288) == 1280 / 8 * one_sequence / 4
    # tensor=8 does not divide 4 KV heads: the heads stay whole, 8x the cache per chip
    ratio = P.kv_cache_bytes_per_chip(cfg, P.abstract_mesh((1, 4, 8)), 1280, 12_288) / P.kv_cache_bytes_per_chip(
        cfg, P.abstract_mesh((1, 8, 4)), 1280, 12_288
    )
    assert ratio == 8


def test_step_time_of_7b_on_v5p_64_by_hand(reports):
    r = reports["7B on v5p-64"]
    cfg = P.preset(Q7)
    n = cfg.num_params - cfg.vocab_size * cfg.hidden_size  # untied: the input embedding is a lookup
    tokens = 1024 * 5 * 12_288
    attn = 4 * cfg.num_layers * 12_288 * cfg.num_heads * cfg.head_dim
    slice_flops = 32 * 459e12 * 0.40
    t = r.times["ceiling"]
    assert t["policy update"] == pytest.approx((8 * n + 4 * attn) * tokens / slice_flops)
    assert t["reference log-probs"] == pytest.approx((2 * n + attn) * tokens / slice_flops)
    # decode: bytes-bound; (bf16 tensor-parallel weights + 320 rows x 1/4 of a 12,288-token
    # cache) / (2,765 GB/s x 0.7)
    weights = r.rollout["sampling weights (bf16 copy, tensor-parallel)"]
    assert weights == pytest.approx(2 * cfg.num_params / 4, rel=1e-3)  # bf16, split 4 ways (norms aside)
    step_bytes = weights + 2560 / 8 * 704_643_072 / 4
    assert t["decode step (ms)"] == pytest.approx(step_bytes / (2765e9 * 0.7) * 1e3)
    prefill = (2 * n + 4 * cfg.num_layers * 4096 * cfg.num_heads * cfg.head_dim) * 512 * 4096 / slice_flops
    assert t["generation"] == pytest.approx(2 * (prefill + 8192 * step_bytes / (2765e9 * 0.7)))
    assert t["run (h)"] == pytest.approx(140 * (t["generation"] + t["reference log-probs"] + t["policy update"]) / 3600)
    typical, trimmed = r.times["typical"], r.times["typical, trimmed"]
    assert typical["policy update"] == pytest.approx((8 * n + 4 * attn * 10_240 / 12_288) * 5120 * 10_240 / slice_flops)
    assert trimmed["step"] < typical["step"] < t["step"]


def test_update_activations_by_hand(reports):
    r = reports["7B on v5p-64"]
    cfg = P.preset(Q7)
    # micro-batch 8 over 8 batch shards: 1 sequence per chip, replicated over tensor
    assert r.update["saved layer inputs (remat)"] == cfg.num_layers * 12_288 * cfg.hidden_size * 2
    # splash (TPU "auto"): logsumexp and dO.O, one float32 per query row and head
    assert (
        r.update["attention logsumexp and dO.O rows, one layer (splash, fp32)"] == 2 * (cfg.num_heads / 4) * 12_288 * 4
    )
    dense = P.plan_report(dataclasses.replace(r.plan, attention_impl="dense"), scenarios=())
    assert dense.update["attention scores, one layer (x3, fp32)"] == 3 * (cfg.num_heads / 4) * 12_288**2 * 4
    blockwise = P.attention_memory("blockwise", cfg, 8, 12_288, 32, backward=True)
    assert sum(blockwise.values()) == (3 * 512 + 128 + 2) * 8 * cfg.num_heads * 12_288 * 4 / 32


def test_fp32_master_weights_are_needed_at_the_paper_learning_rate():
    """The document's reason for fp32 params: a 1e-6 relative step vanishes in bfloat16."""
    import jax.numpy as jnp

    w = jnp.asarray(0.0123, jnp.bfloat16)
    assert (w - w * 1e-6).astype(jnp.bfloat16) == w
    w32 = jnp.asarray(0.0123, jnp.float32)
    assert w32 - w32 * 1e-6 != w32


def test_the_document_shows_exactly_what_plan_py_prints(reports):
    with open(os.path.join(REPO, "docs", "pod_plan.md"), encoding="utf-8") as f:
        doc = f.read()
    begin, end = P.BEGIN, P.END
    assert begin in doc and end in doc, "docs/pod_plan.md lost its plan:begin / plan:end markers"
    embedded = doc.split(begin, 1)[1].split(end, 1)[0]
    assert embedded == P.render(list(reports.values())), (
        "docs/pod_plan.md is stale: run `python tpu_scripts/plan.py --update-doc docs/pod_plan.md`"
    )
    for chip in P.CHIPS.values():  # every figure used is cited in the document
        assert chip.source in doc
    assert math.isclose(P.CHIPS["v5p"].peak_flops, 459e12) and P.CHIPS["v6e"].hbm_bandwidth == 1638e9


def test_lora_plans_on_small_slices(reports):
    """7B fits a v5e-8 and a v4-8 and 14B a v5p-8 with LoRA, each at its largest fitting generation
    batch. On a v5e-8 that takes the linear (splash) attention: with dense attention one layer's
    scores at 12,288 tokens fill most of a 16 GB chip."""
    fits = {name: reports[name].fits for name in (p.name for p in P.LORA_PLANS)}
    assert fits == {"7B LoRA on v5litepod-8": True, "7B LoRA on v4-8": True, "14B LoRA on v5p-8": True}
    for plan in P.LORA_PLANS:
        assert P.largest_generation_prompts(plan) == plan.generation_prompts
    v5e = reports["7B LoRA on v5litepod-8"]
    dense = P.plan_report(dataclasses.replace(v5e.plan, attention_impl="dense"), scenarios=())
    assert dense.update_peak > dense.budget_bytes >= v5e.update_peak
    assert dense.update["attention scores, one layer (x3, fp32)"] > 0.8 * v5e.budget_bytes
    r = reports["7B LoRA on v4-8"]
    assert not any("reference" in k and "base" not in k for k in r.persistent)  # the base is the reference
    assert r.persistent["frozen base (bf16; also the reference)"] == P.param_bytes_per_chip(
        P.preset(Q7), P.abstract_mesh((1, 1, 4)), P.TRAIN_RULES, 2
    )


def test_lora_adapters_and_update_flops_by_hand(reports):
    """Rank 16 on q, k, v, o, gate, up, down of 7B on (1, 1, 4): an adapter is split 4 ways on its
    tensor-parallel side (B of q/k/v/gate/up, A of o/down) and whole on its embed side (fsdp = 1);
    the update is 6N (no base weight gradients) + 8 x adapter params + attention, per token."""
    cfg, r = P.preset(Q7), 16
    d, f, q, kv, layers = cfg.hidden_size, cfg.intermediate_size, 3584, 512, cfg.num_layers
    whole = r * (d + d + d + d + d + d + d)  # A of q, k, v, gate, up; B of o, down: all [.., d, r] / [r, d]
    split = r * (q + kv + kv + f + f + q + f)  # B of q, k, v, gate, up; A of o, down
    want = layers * (whole + split / 4) * 4
    assert reports["7B LoRA on v4-8"].persistent["LoRA adapters, rank 16 (fp32)"] == pytest.approx(want)
    adapter_params = layers * (whole + split)
    assert P.adapter_matmul_params(cfg, P.LORA_PLANS[1].lora) == adapter_params
    n = cfg.num_params - cfg.vocab_size * cfg.hidden_size
    attn = 4 * layers * 12_288 * cfg.num_heads * cfg.head_dim
    slice_flops = 4 * 275e12 * 0.40
    t = reports["7B LoRA on v4-8"].times["ceiling"]
    assert t["policy update"] == pytest.approx((6 * n + 8 * adapter_params + 4 * attn) * 5120 * 12_288 / slice_flops)
    assert t["reference log-probs"] == pytest.approx((2 * n + attn) * 5120 * 12_288 / slice_flops)


def test_the_lora_notebook_settings_fit_colab(capsys):
    """notebooks/lora_grpo.ipynb states these: Qwen2.5-1.5B with LoRA fits a Colab TPU v2-8
    (8 devices of 8 GiB) and a T4 (16 GB) at the notebook's workload."""
    reports = [P.colab_report(p) for p in P.COLAB_PLANS]
    assert [r.fits for r in reports] == [True, True]
    cfg = P.preset("Qwen/Qwen2.5-1.5B-Instruct")
    t4 = reports[1]
    assert t4.chips == 1 and t4.persistent["frozen base (bf16; also the reference)"] == 2 * cfg.num_params
    assert "KV cache, 32 rows x 1536 (bf16)" in t4.rollout
    table = P.render_colab(reports)
    assert table.count("| yes |") == 2 and "Colab TPU v2-8" in table and "8 x TPU v2 core" in table
