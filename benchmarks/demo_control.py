"""The demo's control: the GRPO phase's wall-clock time spent on more SFT instead.

    python benchmarks/demo_control.py                          # runs the demo, then the control
    python benchmarks/demo_control.py --demo_dir runs/tiny_cpu   # reuses a finished demo run
    python benchmarks/demo_control.py --config configs/tiny_cpu.py --config.rl.total_steps=10

1. The demo (`tooln1_jax.train(config)`): SFT warm start, held-out accuracy A_sft, GRPO,
   held-out accuracy A_grpo. Its GRPO time is the sum of the per-step `step_time` in
   metrics.jsonl (rollouts + updates; the held-out evaluations are not counted).
2. The control, in the same process and on the same machine right after: the same seed and
   data give the same warm start (its accuracy is re-measured and must equal A_sft), then
   SFT continues (same optimizer state, the next examples in the same order) until it has
   used the same wall-clock seconds as GRPO; held-out accuracy A_ctrl.

Compute is matched in wall-clock seconds on this machine (what a user of the demo spends),
not in FLOPs: a GRPO step also samples (decode-bound), so per second it does fewer
matmul FLOPs than SFT, which favours the control. Writes `<output_dir>/control.json`.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from tooln1_jax import train as train_lib  # noqa: E402
from tooln1_jax.metrics import METRICS_FILE, read_jsonl  # noqa: E402
from tooln1_jax.sft import _sft_settings, encode_sft, init_sft_state, sft_loop  # noqa: E402

_DEMO_DIR = flags.DEFINE_string("demo_dir", "", "A finished demo run's output_dir to reuse (skip step 1).")


def grpo_seconds(output_dir: str) -> tuple[float, int]:
    """(sum of step_time over the GRPO steps, number of steps) from a run's metrics.jsonl."""
    rows = [r for r in read_jsonl(os.path.join(output_dir, METRICS_FILE)) if "step_time" in r]
    if not rows:
        raise SystemExit(f"{output_dir}/{METRICS_FILE} has no GRPO steps: run the demo first")
    return float(sum(r["step_time"] for r in rows)), len(rows)


def control(config, seconds: float) -> dict:
    """Warm start as in the demo, then more SFT for `seconds`; held-out accuracy after each."""
    setup = train_lib.setup_run(config)
    data = encode_sft(setup.tokenizer, setup.train_records, max_prompt_length=int(config.data.max_prompt_length),
                      max_completion_length=_sft_settings(config)["max_completion_length"])
    state, optimizer = init_sft_state(config, setup.model_config, setup.params, mesh=setup.mesh)
    warm = int(config.sft.warm_start_steps)
    state, m_warm = sft_loop(config, setup.model_config, state, optimizer, data, mesh=setup.mesh, steps=warm)
    acc_warm = train_lib.held_out_accuracy(config, setup, state.params)
    print(f"control: warm start ({warm} SFT steps) held-out accuracy {acc_warm['accuracy']:.3f}", flush=True)
    t0 = time.perf_counter()
    state, m_more = sft_loop(config, setup.model_config, state, optimizer, data, mesh=setup.mesh, start_step=warm,
                             steps=10**9, time_budget_s=seconds)
    spent = time.perf_counter() - t0
    acc_more = train_lib.held_out_accuracy(config, setup, state.params)
    print(f"control: +{m_more['sft_steps']} SFT steps in {spent:.0f} s held-out accuracy {acc_more['accuracy']:.3f}",
          flush=True)
    return {"warm_steps": warm, "accuracy_warm": acc_warm["accuracy"], "extra_sft_steps": m_more["sft_steps"],
            "extra_sft_seconds": spent, "accuracy_more_sft": acc_more["accuracy"],
            "num_scored": acc_more["num_scored"], "sft_final_loss": m_more["sft_final_loss"]}


def main(_):
    config = _CONFIG.value
    out = config.output_dir
    if _DEMO_DIR.value:
        out = _DEMO_DIR.value
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    else:
        summary = train_lib.train(config)
    seconds, steps = grpo_seconds(out)
    ctrl = control(config, seconds)
    result = {
        "accuracy_after_sft": summary["accuracy_start"], "accuracy_after_grpo": summary["accuracy_end"],
        "grpo_steps": steps, "grpo_seconds": seconds, "demo_wall_s": summary.get("wall_s"), **ctrl,
        "compute_matched_by": "wall-clock seconds of the GRPO steps (rollouts + updates), same process",
    }
    with open(os.path.join(out, "control.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"held-out exact-call accuracy: after SFT {result['accuracy_after_sft']:.3f}; "
          f"+GRPO ({steps} steps, {seconds:.0f} s) {result['accuracy_after_grpo']:.3f}; "
          f"+SFT instead ({ctrl['extra_sft_steps']} steps, {ctrl['extra_sft_seconds']:.0f} s) "
          f"{ctrl['accuracy_more_sft']:.3f}  [{out}/control.json]", flush=True)


if __name__ == "__main__":
    _CONFIG = train_lib.define_config_flag()
    app.run(main)
