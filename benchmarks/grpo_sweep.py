"""The demo's GRPO settings chosen on seeds the seed study does not use: GRPO learning rates
(and any other `--config.*` change) tried from one warm start per seed.

    python benchmarks/grpo_sweep.py --seeds=4,5 --lrs=1e-4,3e-4 --out=docs/experiments/grpo_sweep.jsonl

For each seed (`config.seed` and `config.data.synthetic.seed`), the demo's warm start (stopped by
its probe band, as in the demo) is saved once as an HF folder under `<config.output_dir>/seed<s>`;
each learning rate then runs the demo's GRPO phase from it (`model.name_or_path` = that folder, no
warm start). One JSON line per (seed, lr): held-out accuracy at every evaluation, in and out of
distribution, and the warm start's probes.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from tooln1_jax import cli  # noqa: E402
from tooln1_jax.metrics import EVAL_FILE, read_jsonl  # noqa: E402
from tooln1_jax.models import save_pretrained  # noqa: E402
from tooln1_jax.run_setup import setup_run, sft_stop_probe  # noqa: E402
from tooln1_jax.sft import run_sft, summary_metrics  # noqa: E402
from tooln1_jax.train import train  # noqa: E402

_SEEDS = flags.DEFINE_list("seeds", ["4", "5"], "Seeds to tune on (not the seed study's).")
_LRS = flags.DEFINE_list("lrs", ["1e-4", "3e-4"], "GRPO learning rates (optim.lr).")
_TAG = flags.DEFINE_string("tag", "", "Appended to each run's folder name (arms that share a learning rate).")
_OUT = flags.DEFINE_string("out", "runs/grpo_sweep.jsonl", "JSON lines, one per (seed, lr) (appended).")
_CONFIG = cli.define_config_flag()


def warm_start(config, folder: str) -> dict:
    """The demo's warm start of `config`, stopped by its probe band, saved to `folder` (once)."""
    done = os.path.join(folder, "sft_metrics.json")
    if os.path.exists(done):
        with open(done, encoding="utf-8") as f:
            return json.load(f)
    setup = setup_run(config)
    params, metrics = run_sft(
        config,
        setup.model_config,
        setup.params,
        setup.tokenizer,
        setup.train_records,
        mesh=setup.mesh,
        probe=sft_stop_probe(config, setup),
    )
    save_pretrained(setup.model_config, params, folder)
    kept = summary_metrics(metrics)
    with open(done, "w", encoding="utf-8") as f:
        json.dump(kept, f)
    return kept


def main(_):
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    for seed in (int(s) for s in _SEEDS.value):
        config = _CONFIG.value.copy_and_resolve_references()
        config.seed = seed
        config.data.synthetic.seed = seed
        root = os.path.join(config.output_dir, f"sweep_seed{seed}")
        sft = warm_start(config, os.path.join(root, "sft_base"))
        for lr in (float(x) for x in _LRS.value):
            run = config.copy_and_resolve_references()
            run.model.name_or_path = os.path.join(root, "sft_base")
            run.sft.warm_start_steps = 0
            run.optim.lr = lr
            run.output_dir = os.path.join(root, f"lr{lr:g}{_TAG.value}")
            summary = train(run)
            evals = read_jsonl(os.path.join(summary["log_dir"], EVAL_FILE))
            row = {
                "seed": seed,
                "lr": lr,
                "temperature": run.rollout.temperature,
                "group": run.rollout.num_samples,
                "prompts_per_step": run.rl.train_batch_size,
                "sft_steps": sft["sft_steps"],
                "sft_probes": sft.get("sft_probes"),
                "steps": [e["step"] for e in evals],
                "accuracy": [e["accuracy"] for e in evals],
                "ood_accuracy": [e.get("ood_accuracy") for e in evals],
                "wall_s": summary["wall_s"],
            }
            print(json.dumps(row), flush=True)
            with open(_OUT.value, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    app.run(main)
