"""Held-out accuracy along the demo's SFT warm start, per seed: the measurements an SFT stop
band is set from (the warm start should end when groups sampled at temperature 1 hold both right
and wrong answers, which a fixed step count hits on some seeds and misses on others).

    python benchmarks/sft_trajectory.py --seeds=1,2,3 --max_steps=2000 --probe_every=100
    python benchmarks/sft_trajectory.py --config=configs/tiny_cpu.py --config.sft.batch_size=8

For each seed (`config.seed` and `config.data.synthetic.seed` both set to it), SFT runs as in
the demo, and every `probe_every` steps greedy decoding measures exact-call accuracy and the
format-failure rate on `probe_examples` held-out prompts that the demo's evaluation does not use
(the held-out records after the first `eval.num_examples`). One line per probe is printed and
appended to `--out` as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from tooln1_jax import cli  # noqa: E402
from tooln1_jax.run_setup import held_out_accuracy, probe_records, setup_run  # noqa: E402
from tooln1_jax.sft import encode_for_run, init_sft_state, sft_loop  # noqa: E402

_SEEDS = flags.DEFINE_list("seeds", ["1", "2", "3"], "Seeds (run and synthetic data).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", 2000, "SFT steps per seed.")
_PROBE_EVERY = flags.DEFINE_integer("probe_every", 100, "SFT steps between probes.")
_PROBE_EXAMPLES = flags.DEFINE_integer("probe_examples", 100, "Held-out prompts per probe.")
_OUT = flags.DEFINE_string("out", "runs/sft_trajectory.jsonl", "JSON lines, one per probe (appended).")
_CONFIG = cli.define_config_flag()


def trajectory(config, seed: int, *, max_steps: int, probe_every: int, probe_examples: int):
    """Yields one dict per probe: seed, SFT steps, seconds, loss, accuracy, format-failure rate."""
    config.seed = seed
    config.data.synthetic.seed = seed
    setup = setup_run(config)
    config.sft.probe_examples = probe_examples
    probe = probe_records(config, setup)
    if len(probe) < probe_examples:
        raise SystemExit(f"only {len(probe)} held-out records after the evaluation's; lower --probe_examples")
    data = encode_for_run(config, setup.tokenizer, setup.train_records)
    state, optimizer = init_sft_state(config, setup.model_config, setup.params, mesh=setup.mesh)
    done, t0 = 0, time.perf_counter()
    while done < max_steps:
        state, metrics = sft_loop(
            config, setup.model_config, state, optimizer, data, mesh=setup.mesh, start_step=done, steps=probe_every
        )
        done += metrics["sft_steps"]
        acc = held_out_accuracy(config, setup, state.params, records=probe)
        yield {
            "seed": seed,
            "sft_steps": done,
            "seconds": round(time.perf_counter() - t0, 1),
            "sft_loss": metrics["sft_final_loss"],
            "accuracy": acc["accuracy"],
            "format_failure_rate": acc["format_failure_rate"],
            "num_scored": acc["num_scored"],
        }


def main(_):
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    for seed in (int(s) for s in _SEEDS.value):
        for row in trajectory(
            _CONFIG.value,
            seed,
            max_steps=_MAX_STEPS.value,
            probe_every=_PROBE_EVERY.value,
            probe_examples=_PROBE_EXAMPLES.value,
        ):
            print(json.dumps(row), flush=True)
            with open(_OUT.value, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    app.run(main)
