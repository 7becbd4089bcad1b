"""Forward-pass throughput and compile time of `tooln1_jax.models.logits` on 1 and N devices.

On CPU the N devices are virtual (`--xla_force_host_platform_device_count`), sharing the
same cores: N-device numbers there measure sharding overhead, not speed-up. The PyTorch
reference (transformers, same config and batch) runs in the same process, so the ratio
is meaningful on a busy machine.

    python benchmarks/forward.py                       # small config, 1 and 8 devices
    python benchmarks/forward.py --rules sample --batch 16 --seq 256 --no-torch
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dtype", default="float32", help="compute dtype (params stay float32)")
    p.add_argument("--devices", default="1,8", help="comma-separated device counts to run on")
    p.add_argument("--mesh", default="2,2,2", help="data,fsdp,tensor for the multi-device runs (-1 = rest)")
    p.add_argument("--rules", choices=["train", "sample"], default="train")
    p.add_argument("--iters", type=int, default=5, help="timed forwards per device count (median reported)")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    counts = [int(n) for n in args.devices.split(",")]
    # Virtual CPU devices must be requested before JAX starts.
    if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={max(counts)}"
        ).strip()
    import jax
    import numpy as np

    from tooln1_jax.models import ModelConfig, init_params, logits, shard_params
    from tooln1_jax.sharding import SAMPLE_RULES, TRAIN_RULES, batch_sharding, make_mesh

    config = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        dtype=args.dtype,
    )
    rules = TRAIN_RULES if args.rules == "train" else SAMPLE_RULES
    tokens = args.batch * args.seq
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    params = init_params(config, jax.random.key(0))
    print(
        f"backend={jax.default_backend()} devices={jax.device_count()} params={config.num_params / 1e6:.1f}M "
        f"batch={args.batch} seq={args.seq} dtype={args.dtype} rules={args.rules}"
    )

    results = {}
    for n in counts:
        if n > jax.device_count():
            print(f"skip {n} devices: only {jax.device_count()} available")
            continue
        data, fsdp, tensor = (int(x) for x in args.mesh.split(",")) if n > 1 else (1, 1, 1)
        mesh = make_mesh(data, fsdp, tensor, devices=jax.devices()[:n])
        sharded = shard_params(params, config, mesh, rules)
        rows = batch_sharding(mesh, rules, 2, args.batch)
        x, m = jax.device_put(ids, rows), jax.device_put(mask, rows)
        start = time.perf_counter()
        compiled = logits.lower(config, sharded, x, m).compile()
        compile_s = time.perf_counter() - start
        compiled(sharded, x, m).block_until_ready()  # warm-up
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            compiled(sharded, x, m).block_until_ready()
            times.append(time.perf_counter() - start)
        step = statistics.median(times)
        results[n] = tokens / step
        print(
            f"jax   {n} device(s) mesh={dict(mesh.shape)}: compile {compile_s:6.2f} s, "
            f"forward {step * 1e3:8.1f} ms, {tokens / step:10.0f} tok/s"
        )

    if not args.no_torch:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        hf = config.to_hf()
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"}),
            dtype=torch.bfloat16 if args.dtype == "bfloat16" else torch.float32,
        ).eval()
        t_ids = torch.tensor(ids, dtype=torch.long)
        times = []
        with torch.no_grad():
            model(t_ids)
            for _ in range(args.iters):
                start = time.perf_counter()
                model(t_ids)
                times.append(time.perf_counter() - start)
        ref = tokens / statistics.median(times)
        print(f"torch (transformers, {torch.get_num_threads()} threads): {ref:10.0f} tok/s")
        for n, tps in results.items():
            print(f"ratio jax {n} device(s) / torch: {tps / ref:.2f}x")


if __name__ == "__main__":
    main()
