"""The demo's GRPO settings chosen on seeds the seed study does not use: GRPO learning rates
(and any other `--config.*` change) tried from one warm start per seed.

    python benchmarks/grpo_sweep.py --seeds=4,5 --lrs=1e-4,3e-4 --out=docs/experiments/grpo_sweep.jsonl

For each seed (`config.seed` and `config.data.synthetic.seed`), the demo's warm start (stopped by
its probe band, as in the demo) is saved once as an HF folder under `<config.output_dir>/seed<s>`;
each learning rate then runs the demo's GRPO phase from it (`model.name_or_path` = that folder, no
warm start). One JSON line per (seed, lr): held-out accuracy at every evaluation, in and out of
distribution, and the warm start's probes.

    python benchmarks/grpo_sweep.py --seeds=0,4,5,12 --coverage --out=docs/experiments/warm_start_coverage.jsonl

With `--coverage`, no GRPO runs: each seed's warm start samples `rollout.num_samples` completions
at `rollout.temperature` for each SFT probe prompt, as GRPO would, and one JSON line per seed gives
the groups' coverage (`rollouts.group_coverage`), per tool its prompts, pass@k and mean exact-call
accuracy, and per argument type (the ground truth's JSON type) how often a sampled call of the
right tool holds the right value. GRPO learns only from groups with right and wrong answers; a kind
of problem no sample solves gives it nothing to reinforce (the diagnosis of seed 0, issue 18).
"""

from __future__ import annotations

import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from tooln1_jax import cli, rollouts  # noqa: E402
from tooln1_jax.data.prompt import encode_prompts  # noqa: E402
from tooln1_jax.metrics import EVAL_FILE, read_jsonl  # noqa: E402
from tooln1_jax.models import load_pretrained, save_pretrained  # noqa: E402
from tooln1_jax.rewards import canonical_json, parse_tool_calls  # noqa: E402
from tooln1_jax.run_setup import probe_records, setup_run, sft_stop_probe  # noqa: E402
from tooln1_jax.sft import run_sft, summary_metrics  # noqa: E402
from tooln1_jax.train import train  # noqa: E402

_SEEDS = flags.DEFINE_list("seeds", ["4", "5"], "Seeds to tune on (not the seed study's).")
_LRS = flags.DEFINE_list("lrs", ["1e-4", "3e-4"], "GRPO learning rates (optim.lr).")
_TAG = flags.DEFINE_string("tag", "", "Appended to each run's folder name (arms that share a learning rate).")
_OUT = flags.DEFINE_string("out", "runs/grpo_sweep.jsonl", "JSON lines, one per (seed, lr) (appended).")
_COVERAGE = flags.DEFINE_bool("coverage", False, "Only sample each warm start as GRPO would and report what it solves.")
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


def argument_hits(records, completions: list[str], num_samples: int) -> dict[str, list[bool]]:
    """JSON type of each ground-truth argument -> one flag per (argument, sample): the sample
    called the right tool (first call) with that argument's value, equal as the reward judges
    (`canonical_json`: the integer 1 is not `true`). `completions` holds `num_samples` per record,
    record by record."""
    hits = collections.defaultdict(list)
    for i, record in enumerate(records):
        truth = record.answer[0]
        for text in completions[i * num_samples : (i + 1) * num_samples]:
            calls = parse_tool_calls(text) or [{}]
            first = calls[0] if isinstance(calls[0], dict) else {}
            got = first.get("arguments") if first.get("name") == truth["name"] else None
            for key, value in truth["arguments"].items():
                hit = isinstance(got, dict) and key in got and canonical_json(got[key]) == canonical_json(value)
                hits[type(value).__name__].append(hit)
    return hits


def coverage(config, folder: str) -> dict:
    """The warm start in `folder`, sampled on the probe prompts of `config`'s data."""
    setup = setup_run(config, load_weights=False)
    model_config, params = load_pretrained(folder)
    ro = config.rollout
    prompt_ids, kept, _ = encode_prompts(
        setup.tokenizer, probe_records(config, setup), max_prompt_length=int(config.data.max_prompt_length)
    )
    n = int(ro.num_samples)
    batch = rollouts.generate_and_score(
        model_config,
        params,
        setup.tokenizer,
        prompt_ids,
        kept,
        num_samples=n,
        max_new_tokens=int(ro.max_new_tokens),
        temperature=float(ro.temperature),
        rng=jax.random.key(int(config.seed)),
    )
    right = batch.correct.reshape(-1, n)
    tools = collections.defaultdict(list)
    for record, row in zip(kept, right):
        tools[record.answer[0]["name"]].append(row)
    return {
        **rollouts.group_coverage(batch.correct, n),
        "num_groups": len(kept),
        "tools": {
            name: {
                "prompts": len(rows),
                "pass_at_k": float(np.mean([r.max() for r in rows])),
                "mean": float(np.mean(rows)),
            }
            for name, rows in sorted(tools.items())
        },
        "argument_types": {
            t: {"values": len(h), "hit_rate": float(np.mean(h))}
            for t, h in sorted(argument_hits(kept, batch.completions, n).items())
        },
    }


def main(_):
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    for seed in (int(s) for s in _SEEDS.value):
        config = _CONFIG.value.copy_and_resolve_references()
        config.seed = seed
        config.data.synthetic.seed = seed
        root = os.path.join(config.output_dir, f"sweep_seed{seed}")
        sft = warm_start(config, os.path.join(root, "sft_base"))
        if _COVERAGE.value:
            row = {"seed": seed, "sft_steps": sft["sft_steps"], "sft_probes": sft.get("sft_probes")}
            _append({**row, **coverage(config, os.path.join(root, "sft_base"))})
            continue
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
            _append(row)


def _append(row: dict) -> None:
    print(json.dumps(row), flush=True)
    with open(_OUT.value, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    app.run(main)
