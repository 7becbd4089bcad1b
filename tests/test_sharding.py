"""The mesh, the rule sets, and sharded forwards on 8 virtual CPU devices (see conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tooln1_jax import distributed
from tooln1_jax.models import (
    ModelConfig,
    cache_sharding,
    forward_cached,
    init_cache,
    init_params,
    load_pretrained,
    logits,
    param_sharding,
    save_pretrained,
    shard_params,
)
from tooln1_jax.sharding import (
    SAMPLE_RULES,
    TRAIN_RULES,
    ShardingRules,
    batch_sharding,
    fit_axes,
    logical_to_spec,
    make_mesh,
)

# Every sharded dimension divisible by 2 (so the (2, 2, 2) mesh really splits each one).
CONFIG = ModelConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=1e4,
)
# Nothing divisible by 8: the fit drops mesh axes instead of failing.
ODD = ModelConfig(
    vocab_size=97,
    hidden_size=12,
    intermediate_size=20,
    num_layers=2,
    num_heads=3,
    num_kv_heads=1,
    head_dim=6,
    attention_bias=False,
    model_type="llama",
    tie_word_embeddings=True,
)


def batch(vocab, rows=4, t=6, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (rows, t))
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding in one row
    return jnp.asarray(ids), jnp.asarray(mask)


def test_make_mesh_sizes_and_errors():
    assert jax.device_count() == 8
    mesh = make_mesh(data=2, fsdp=-1, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert make_mesh(1, 1, 1).devices.size == 1  # a sub-mesh on the first device
    with pytest.raises(ValueError, match="3 does not divide the 8 available devices"):
        make_mesh(data=3)
    with pytest.raises(ValueError, match="at most one axis size may be -1"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="sizes must be positive"):
        make_mesh(data=0)


def test_fit_drops_axes_that_do_not_divide():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert fit_axes(("data", "fsdp"), 8, mesh) == ("data", "fsdp")
    assert fit_axes(("data", "fsdp"), 2, mesh) == ("data",)
    assert fit_axes(("data", "fsdp"), 3, mesh) == ()
    assert fit_axes(("data", "fsdp"), 8, mesh, taken={"data"}) == ("fsdp",)
    assert logical_to_spec(("layers", "embed", "mlp"), mesh, TRAIN_RULES, (2, 32, 64)) == P(None, "fsdp", "tensor")
    assert logical_to_spec(("layers", "embed", "mlp"), mesh, TRAIN_RULES, (2, 31, 64)) == P(None, None, "tensor")
    assert logical_to_spec(("layers", "embed", "mlp"), mesh, SAMPLE_RULES, (2, 32, 64)) == P(None, None, "tensor")
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("nonsense",), mesh, TRAIN_RULES)
    with pytest.raises(KeyError, match="mesh axis 'model'"):
        logical_to_spec(("mlp",), mesh, ShardingRules(mlp="model"))


@pytest.mark.parametrize("rules", [TRAIN_RULES, SAMPLE_RULES], ids=["train", "sample"])
def test_sharded_forward_equals_single_device(rules):
    params = init_params(CONFIG, jax.random.key(0))
    ids, mask = batch(CONFIG.vocab_size)
    ref = np.asarray(logits(CONFIG, params, ids, mask))

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = shard_params(params, CONFIG, mesh, rules)
    gate = sharded["layers"]["gate_proj"]  # [L, D, F] = [2, 32, 64]
    if rules is TRAIN_RULES:
        assert gate.sharding.spec == P(None, "fsdp", "tensor")
        assert {s.data.shape for s in gate.addressable_shards} == {(2, 16, 32)}
        assert sharded["embed"].sharding.spec == P("tensor", "fsdp")
    else:  # tensor-parallel only: each shard is replicated over data x fsdp
        assert gate.sharding.spec == P(None, None, "tensor")
        assert {s.data.shape for s in gate.addressable_shards} == {(2, 32, 32)}
        assert sharded["embed"].sharding.spec == P("tensor", None)
    assert sharded["layers"]["k_proj"].sharding.spec[-1] == "tensor"
    assert len(gate.addressable_shards) == 8

    in_sharding = batch_sharding(mesh, rules, ndim=2, batch_size=ids.shape[0])
    assert in_sharding.spec == P(("data", "fsdp"), None)
    out = logits(CONFIG, sharded, jax.device_put(ids, in_sharding), jax.device_put(mask, in_sharding))
    assert np.abs(np.asarray(out) - ref).max() < 1e-5


def test_indivisible_model_still_runs_on_8_devices():
    params = init_params(ODD, jax.random.key(1))
    ids, mask = batch(ODD.vocab_size, rows=3)
    ref = np.asarray(logits(ODD, params, ids, mask))
    mesh = make_mesh(fsdp=4, tensor=2)
    sharded = shard_params(params, ODD, mesh, TRAIN_RULES)
    assert sharded["embed"].sharding.spec == P(None, "fsdp")  # vocab 97 is odd; hidden 12 splits over 4
    assert sharded["layers"]["gate_proj"].sharding.spec == P(None, "fsdp", "tensor")
    assert sharded["layers"]["k_proj"].sharding.spec == P(None, "fsdp", "tensor")  # 1 kv head x 6
    spec = batch_sharding(mesh, TRAIN_RULES, ndim=2, batch_size=3).spec
    assert spec == P(None, None)  # 3 rows do not split over fsdp=4
    out = logits(ODD, sharded, jax.device_put(ids, batch_sharding(mesh, TRAIN_RULES, 2, 3)), mask)
    assert np.abs(np.asarray(out) - ref).max() < 1e-5


def test_sharded_kv_cache_prefill_and_decode():
    params = init_params(CONFIG, jax.random.key(2))
    ids, mask = batch(CONFIG.vocab_size, rows=4, t=5, seed=3)
    step = jax.jit(forward_cached, static_argnums=0)
    ref, ref_cache = step(CONFIG, params, ids, mask, init_cache(CONFIG, 4, 8))

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    cache = init_cache(CONFIG, 4, 8)
    shardings = cache_sharding(cache, mesh, SAMPLE_RULES)
    assert shardings.k[0].spec == P(("data", "fsdp"), "tensor", None, None)
    assert shardings.mask.spec == P(("data", "fsdp"), None) and shardings.index.spec == P()
    cache = jax.device_put(cache, shardings)
    assert {s.data.shape for s in cache.k[1].addressable_shards} == {(1, 1, 8, 8)}
    sp = shard_params(params, CONFIG, mesh, SAMPLE_RULES)
    rows = batch_sharding(mesh, SAMPLE_RULES, 2, 4)
    hidden, cache = step(CONFIG, sp, jax.device_put(ids, rows), jax.device_put(mask, rows), cache)
    assert np.abs(np.asarray(hidden) - np.asarray(ref)).max() < 1e-5
    token = jnp.asarray([[1], [2], [3], [4]])
    one = jnp.ones((4, 1), jnp.int32)
    h_ref, _ = step(CONFIG, params, token, one, ref_cache)
    h, _ = step(CONFIG, sp, jax.device_put(token, rows), jax.device_put(one, rows), cache)
    assert np.abs(np.asarray(h) - np.asarray(h_ref)).max() < 1e-5


def test_load_pretrained_places_params_on_the_mesh(tmp_path):
    params = init_params(CONFIG, jax.random.key(4))
    save_pretrained(CONFIG, params, tmp_path, max_shard_bytes=10_000)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    _, loaded = load_pretrained(tmp_path, mesh=mesh, rules=TRAIN_RULES)
    expected = param_sharding(CONFIG, mesh, TRAIN_RULES)
    for arr, sharding, ref in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected), jax.tree.leaves(params)):
        assert arr.sharding == sharding
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(ref))
    assert {s.data.shape for s in loaded["layers"]["down_proj"].addressable_shards} == {(2, 32, 16)}
    _, sample = load_pretrained(tmp_path, mesh=mesh, rules=SAMPLE_RULES)
    assert sample["layers"]["q_proj"].sharding.spec == P(None, None, "tensor")


def test_distributed_start_is_behind_a_flag():
    assert distributed.initialize(enabled=False) is False
