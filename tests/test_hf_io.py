"""HF checkpoints in and out: transformers reads what we write, exact round trips, a real model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tooln1_jax.models import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    ModelConfig,
    load_pretrained,
    logits,
    save_pretrained,
)
from tooln1_jax.models.params import param_shapes

QWEN_UNTIED = ModelConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=1e4,
    eos_token_id=(3, 5),
)
LLAMA_TIED = ModelConfig(
    vocab_size=80,
    hidden_size=48,
    intermediate_size=64,
    num_layers=3,
    num_heads=4,
    num_kv_heads=1,
    head_dim=16,
    attention_bias=False,
    model_type="llama",
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


def random_params(config: ModelConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    """Every leaf random (norms and biases too), so a mixed-up tensor name or layout shows."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [(0.1 * jax.random.normal(k, s)).astype(dtype) for k, s in zip(keys, leaves)])


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def hf_logits(folder, ids, dtype=torch.float32) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("config", [QWEN_UNTIED, LLAMA_TIED], ids=["qwen2-untied", "llama-tied"])
def test_transformers_loads_what_we_save_with_same_logits(config, tmp_path):
    params = random_params(config)
    save_pretrained(config, params, tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert files == ["config.json", "model.safetensors"]
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
        assert ("lm_head.weight" in f.keys()) == (not config.tie_word_embeddings)
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 7))
    ours = np.asarray(logits(config, params, jnp.asarray(ids)))
    assert np.abs(ours - hf_logits(tmp_path, ids)).max() < 1e-4


def test_load_save_load_is_exact(tmp_path):
    params = random_params(QWEN_UNTIED, seed=1)
    save_pretrained(QWEN_UNTIED, params, tmp_path / "a")
    config, loaded = load_pretrained(tmp_path / "a")
    assert config == QWEN_UNTIED
    assert_trees_equal(loaded, params)
    save_pretrained(config, loaded, tmp_path / "b")
    config_b, loaded_b = load_pretrained(tmp_path / "b")
    assert config_b == config
    assert_trees_equal(loaded_b, loaded)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_bfloat16_checkpoint_round_trip(tmp_path):
    params = random_params(LLAMA_TIED, seed=2, dtype=jnp.bfloat16)
    save_pretrained(LLAMA_TIED, params, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    _, loaded = load_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert_trees_equal(loaded, params)
    _, as_f32 = load_pretrained(tmp_path, dtype=jnp.float32, compute_dtype="bfloat16")
    assert_trees_equal(as_f32, jax.tree.map(lambda a: a.astype(jnp.float32), params))
    ids = np.random.RandomState(1).randint(0, LLAMA_TIED.vocab_size, (1, 6))
    ours = np.asarray(logits(LLAMA_TIED, as_f32, jnp.asarray(ids)))
    assert np.abs(ours - hf_logits(tmp_path, ids)).max() < 1e-4  # transformers upcasts the bf16 weights too


def test_sharded_safetensors_folder(tmp_path):
    params = random_params(QWEN_UNTIED, seed=3)
    save_pretrained(QWEN_UNTIED, params, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and all((tmp_path / f).exists() for f in files)
    assert not (tmp_path / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == 4 * QWEN_UNTIED.num_params
    _, loaded = load_pretrained(tmp_path)
    assert_trees_equal(loaded, params)
    ids = np.random.RandomState(2).randint(0, QWEN_UNTIED.vocab_size, (2, 5))
    assert np.abs(np.asarray(logits(QWEN_UNTIED, params, jnp.asarray(ids))) - hf_logits(tmp_path, ids)).max() < 1e-4
    # Saving again unsharded into the same folder leaves no stale shards behind.
    save_pretrained(QWEN_UNTIED, params, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_missing_path_and_offline_hub_id_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as missing:
        load_pretrained(str(tmp_path / "no" / "such" / "folder"))
    assert "no such local folder" in str(missing.value) and "\n" not in str(missing.value)
    hub_id = "Qwen/Qwen2.5-0.5B-Instruct"
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: no hub here
    with pytest.raises(CheckpointNotFoundError) as offline:
        load_pretrained(hub_id)
    message = str(offline.value)
    assert hub_id in message and "\n" not in message and len(message) < 300
    assert offline.value.__cause__ is None and offline.value.__suppress_context__  # no chained traceback


def test_malformed_checkpoints_name_the_problem(tmp_path):
    from safetensors.numpy import load_file, save_file

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(QWEN_UNTIED.to_hf()))
    with pytest.raises(CheckpointFormatError, match="neither model.safetensors"):
        load_pretrained(tmp_path / "empty")

    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    with pytest.raises(CheckpointFormatError, match=r"config\.json: missing field 'num_attention_heads'"):
        load_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointFormatError, match=r"config\.json: Expecting property name"):
        load_pretrained(tmp_path / "empty")

    folder = tmp_path / "broken"
    save_pretrained(QWEN_UNTIED, random_params(QWEN_UNTIED), folder)
    tensors = load_file(folder / "model.safetensors")
    good = dict(tensors)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_pretrained(folder)

    tensors = dict(good, **{"model.layers.0.mlp.up_proj.weight": good["model.layers.0.mlp.up_proj.weight"][:-1]})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match=r"up_proj\.weight has shape \(63, 32\)"):
        load_pretrained(folder)

    tensors = dict(good, **{"model.layers.0.mlp.extra.weight": good["model.norm.weight"]})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match="does not use"):
        load_pretrained(folder)


# ----------------------------------------------------------------------------- the real SmolLM2


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """(our config, our params, transformers model, tokenizer) for SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, params = load_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return config, params, model, AutoTokenizer.from_pretrained(smollm2_dir)


def chat_ids(tokenizer, question: str) -> np.ndarray:
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    return np.asarray([ids])


def test_smollm2_logits_match_transformers_on_a_chat_prompt(smollm2):
    config, params, model, tokenizer = smollm2
    assert config.model_type == "llama" and config.num_layers == 30 and config.tie_word_embeddings
    messages = [
        {"role": "user", "content": "Name three prime numbers and explain why they are prime."},
        {"role": "assistant", "content": "2, 3 and 5: each has no divisor but 1 and itself."},
    ]
    ids = np.asarray([tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]])
    ours = np.asarray(logits(config, params, jnp.asarray(ids)))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    assert ids.shape[1] > 40
    assert np.abs(ours - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_smollm2_greedy_answer_equals_transformers_generate(smollm2):
    config, params, model, tokenizer = smollm2
    prompt = chat_ids(tokenizer, "What is the capital of France?")
    new_tokens = 16
    with torch.no_grad():
        ref = model.generate(torch.tensor(prompt), max_new_tokens=new_tokens, do_sample=False)[
            0, prompt.shape[1] :
        ].tolist()

    # Greedy with the full forward over a fixed-size buffer (one compile; causal attention
    # means the tokens after position n-1 do not change its logits). The KV-cache decode
    # path is checked against this same full forward in test_model.py.
    buffer = np.zeros((1, prompt.shape[1] + new_tokens), np.int32)
    buffer[0, : prompt.shape[1]] = prompt[0]
    ours = []
    for n in range(prompt.shape[1], buffer.shape[1]):
        token = int(jnp.argmax(logits(config, params, jnp.asarray(buffer))[0, n - 1]))
        ours.append(token)
        if token == tokenizer.eos_token_id:
            break
        buffer[0, n] = token

    assert ours == ref  # generate stops after eos too
    text = tokenizer.decode(ours, skip_special_tokens=True)
    assert text == tokenizer.decode(ref, skip_special_tokens=True)
    assert text.strip() == "The capital of France is Paris."
