"""The demo over several seeds, three arms each, in and out of distribution (issue 18's study).

    python benchmarks/seed_study.py --seeds=12,13,14 --out=docs/experiments/seed_study.jsonl
    python benchmarks/seed_study.py --report --out=docs/experiments/seed_study.jsonl   # table + plot only

For each seed (`config.seed` and `config.data.synthetic.seed` both set to it), with the demo's
config trained on the "seen" query wordings (`data.synthetic.phrasing`):
1. SFT only: the warm start (stopped by its probe, `config.sft.stop_accuracy`, or its step count);
2. SFT then GRPO: the demo (`train`), from that warm start;
3. the control: the same warm start, then SFT for the GRPO phase's FLOPs (`demo_control.control`).
Each arm is scored greedily on the held-out problems in distribution and on problems worded only
with the held-out templates (out of distribution). One JSON line per seed goes to `--out`; the
report prints a markdown table (mean and min..max over seeds) and writes a bar plot beside `--out`.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks.demo_control import control, grpo_trained_groups  # noqa: E402
from tooln1_jax import cli  # noqa: E402
from tooln1_jax.metrics import EVAL_FILE, METRICS_FILE, read_jsonl  # noqa: E402
from tooln1_jax.run_setup import log_directory  # noqa: E402
from tooln1_jax.train import train  # noqa: E402

_SEEDS = flags.DEFINE_list("seeds", ["12", "13", "14"], "Seeds (run and synthetic data).")
_OUT = flags.DEFINE_string("out", "runs/seed_study.jsonl", "JSON lines, one per seed (appended).")
_REPORT = flags.DEFINE_bool("report", False, "Only print the table and write the plot from --out.")
_REUSE = flags.DEFINE_bool(
    "reuse_runs", False, "Read a finished demo (summary.json in <output_dir>/seed<s>) instead of training it again."
)
_CONFIG = cli.define_config_flag()

ARMS = (("sft", "SFT only"), ("grpo", "SFT then GRPO"), ("control", "SFT, more SFT (equal compute)"))


def one_seed(config, seed: int) -> dict:
    """The three arms of one seed: in- and out-of-distribution accuracy of each, and the costs."""
    config.seed = seed
    config.data.synthetic.seed = seed
    with config.unlocked():  # train on the "seen" wordings: the held-out one is the OOD split
        config.data.synthetic.phrasing = "seen"
    config.output_dir = os.path.join(config.output_dir, f"seed{seed}")
    finished = os.path.join(log_directory(config), "summary.json")
    if _REUSE.value and os.path.exists(finished):  # the demo already ran: only the control is left
        with open(finished, encoding="utf-8") as f:
            summary = json.load(f)
    else:
        summary = train(config)
    start, end = summary["eval_start"], summary["eval_end"]
    steps = read_jsonl(os.path.join(summary["log_dir"], METRICS_FILE))
    first, last = steps[: len(steps) // 4], steps[-(len(steps) // 4) :]  # the first and last quarter

    def mean(rows, key):
        return round(sum(r[key] for r in rows) / max(len(rows), 1), 4)

    trained = grpo_trained_groups(summary["log_dir"])
    ctrl = control(
        config, warm_steps=summary["sft"]["sft_steps"], grpo_steps=int(config.rl.total_steps), trained_groups=trained
    )
    return {
        "seed": seed,
        "sft_steps": summary["sft"]["sft_steps"],
        "sft_probes": summary["sft"].get("sft_probes"),
        "sft_stopped_in_band": summary["sft"].get("sft_stopped_in_band"),
        "grpo_steps": summary["steps_done"],
        "control_extra_sft_steps": ctrl["extra_sft_steps"],
        "grpo_trained_groups": trained,
        "wall_s": summary["wall_s"],
        "sft": {"id": start["accuracy"], "ood": start["ood_accuracy"], **_reasoning(start)},
        "grpo": {"id": end["accuracy"], "ood": end["ood_accuracy"], **_reasoning(end)},
        # GRPO's training signal, first and last quarter of its steps (sampled at temperature)
        "train": {k: [mean(first, k), mean(last, k)] for k in ("reward_mean", "zero_std_group_frac", "think_chars")},
        "accuracy_curve": [(e["step"], e["accuracy"], e.get("ood_accuracy")) for e in _evals(summary)],
        "control": {"id": ctrl["accuracy_more_sft"], "ood": ctrl["ood_accuracy_more_sft"]},
        "control_warm_check": ctrl["accuracy_warm"],  # the re-trained warm start: equals sft.id
        "num_scored": {"id": end["num_scored"], "ood": end["ood_num_scored"]},
    }


def _reasoning(evaluation: dict) -> dict:
    """How often greedy completions reason, and how long (`<think>` characters)."""
    return {"think_frac": evaluation["think_frac"], "think_chars": evaluation["think_chars"]}


def _evals(summary: dict) -> list[dict]:
    return read_jsonl(os.path.join(summary["log_dir"], EVAL_FILE))


def report(rows: list[dict], plot_path: str) -> str:
    """A markdown table of the arms (mean, min..max over the seeds, per seed) and a bar plot."""
    lines = [
        "| arm | in distribution | out of distribution | per seed (id / ood) |",
        "|---|---|---|---|",
    ]
    for key, name in ARMS:
        cells = []
        for split in ("id", "ood"):
            v = [100 * r[key][split] for r in rows]
            cells.append(f"{sum(v) / len(v):.1f}% ({min(v):.1f}..{max(v):.1f})")
        per_seed = ", ".join(f"{r['seed']}: {100 * r[key]['id']:.1f} / {100 * r[key]['ood']:.1f}" for r in rows)
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {per_seed} |")
    lines += [
        "",
        "| seed | SFT steps | after SFT | after GRPO | gain | zero-variance groups, first / last quarter |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        zero = r["train"]["zero_std_group_frac"]
        lines.append(
            f"| {r['seed']} | {r['sft_steps']} | {100 * r['sft']['id']:.1f}% | {100 * r['grpo']['id']:.1f}% "
            f"| {100 * (r['grpo']['id'] - r['sft']['id']):+.1f} | {zero[0]:.2f} / {zero[1]:.2f} |"
        )
    from matplotlib.figure import Figure  # only the report draws

    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    for i, split in enumerate(("id", "ood")):
        for j, (key, name) in enumerate(ARMS):
            x = i * 4 + j
            values = [100 * r[key][split] for r in rows]
            ax.bar(x, sum(values) / len(values), color=f"C{j}", label=name if i == 0 else None)
            ax.plot([x] * len(values), values, "k.", markersize=5)
    ax.set_xticks([1, 5], ["in distribution", "out of distribution (held-out wording)"])
    ax.set_ylabel("held-out exact-call accuracy (%)")
    ax.set_title(f"Demo, {len(rows)} seeds (bars: mean; dots: seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot_path, dpi=120)
    return "\n".join(lines)


def main(_):
    if not _REPORT.value:
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        for seed in (int(s) for s in _SEEDS.value):
            row = one_seed(_CONFIG.value.copy_and_resolve_references(), seed)
            print(json.dumps(row), flush=True)
            with open(_OUT.value, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    rows = read_jsonl(_OUT.value)
    print(report(rows, os.path.splitext(_OUT.value)[0] + ".png"))


if __name__ == "__main__":
    app.run(main)
