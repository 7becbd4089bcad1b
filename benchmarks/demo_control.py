"""The demo's control: the compute of the GRPO phase spent on more SFT instead.

    python benchmarks/demo_control.py                            # the demo, then the control
    python benchmarks/demo_control.py --demo_dir runs/tiny_cpu     # reuse a finished demo run
    python benchmarks/demo_control.py --match=wallclock            # match seconds, not FLOPs

1. The demo (`train(config)`): SFT warm start, held-out accuracy A_sft, GRPO,
   held-out accuracy A_grpo (skipped with --demo_dir, or with --match=flops --no_demo).
2. The control: the same seed and data give the same warm start (its accuracy is
   re-measured), then SFT continues (same optimizer state, the next examples in order) for
   the matched compute; held-out accuracy A_ctrl.

Matching (`--match`):
- `flops` (default; machine- and load-independent): model FLOPs counted as token passes of
  the decoder, a training token (forward + backward) = 3 forward passes. A GRPO step costs
  B*P (prefill) + B*n*R (decode) + 3*G*n*(P+R)*ppo_epochs (update) [+ G*n*(P+R) reference
  forward if kl_coef > 0], with B prompts sampled (`rl.rollout_batch_size`), n samples each,
  G groups trained (all B, or with `rl.filter_zero_std_groups` those of the demo's
  `trained_groups` log), P the rollout prompt width (the power-of-two bucket of the longest
  training prompt, what the sampler pads to), R = max_new_tokens. An SFT step costs
  3*batch*(P_sft + C). Attention's length-dependent part is ignored.
- `wallclock`: the sum of the demo's per-step `step_time` (rollouts + updates, no evals), spent
  on SFT in this process right after (noisy on a shared machine).
Writes `<output_dir>/control_<match>.json`.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from tooln1_jax import cli  # noqa: E402
from tooln1_jax.config import rollout_prompts  # noqa: E402
from tooln1_jax.metrics import METRICS_FILE, read_jsonl  # noqa: E402
from tooln1_jax.run_setup import held_out_results, setup_run  # noqa: E402
from tooln1_jax.sampling import length_bucket  # noqa: E402
from tooln1_jax.sft import encode_for_run, init_sft_state, sft_loop  # noqa: E402
from tooln1_jax.train import train  # noqa: E402

_DEMO_DIR = flags.DEFINE_string("demo_dir", "", "A finished demo run's output_dir to reuse (skip step 1).")
_MATCH = flags.DEFINE_enum("match", "flops", ["flops", "wallclock"], "How the control's compute is matched.")
_NO_DEMO = flags.DEFINE_bool("no_demo", False, "With --match=flops: run the control only.")


def matched_sft_steps(
    config, grpo_steps: int, rl_prompt_width: int, sft_width: int, trained_groups: int | None = None
) -> tuple[int, dict]:
    """SFT steps with the token-pass FLOPs of `grpo_steps` GRPO steps that trained
    `trained_groups` groups in all (None: every step trained `rl.train_batch_size`); module doc."""
    b, n, r = rollout_prompts(config), int(config.rollout.num_samples), int(config.rollout.max_new_tokens)
    trained = grpo_steps * int(config.rl.train_batch_size) if trained_groups is None else int(trained_groups)
    t = rl_prompt_width + r
    grpo = grpo_steps * (b * rl_prompt_width + b * n * r) + 3 * trained * n * t * int(config.rl.ppo_epochs)
    if config.rl.kl_coef:
        grpo += trained * n * t
    sft = 3 * int(config.sft.batch_size) * sft_width
    return max(1, round(grpo / sft)), {"grpo_token_passes": grpo, "sft_step_token_passes": sft}


def grpo_trained_groups(output_dir: str) -> int:
    """Groups the demo's updates trained on, summed over its steps (metrics.jsonl's `trained_groups`)."""
    return int(sum(r["trained_groups"] for r in read_jsonl(os.path.join(output_dir, METRICS_FILE)) if "step_time" in r))


def grpo_seconds(output_dir: str) -> tuple[float, int]:
    """(sum of step_time over the GRPO steps, number of steps) from a run's metrics.jsonl."""
    rows = [r for r in read_jsonl(os.path.join(output_dir, METRICS_FILE)) if "step_time" in r]
    if not rows:
        raise SystemExit(f"{output_dir}/{METRICS_FILE} has no GRPO steps: run the demo first")
    return float(sum(r["step_time"] for r in rows)), len(rows)


def control(
    config,
    *,
    warm_steps: int | None = None,
    seconds: float | None = None,
    grpo_steps: int | None = None,
    trained_groups: int | None = None,
) -> dict:
    """Warm start as in the demo (`warm_steps` SFT steps, the demo's own count when its warm start
    stopped on the probe), then more SFT for `seconds` (wall-clock matching) or for the FLOPs of
    `grpo_steps` GRPO steps that trained `trained_groups` groups (`matched_sft_steps`); held-out
    (and out-of-distribution) accuracy after each."""
    setup = setup_run(config)
    data = encode_for_run(config, setup.tokenizer, setup.train_records)
    state, optimizer = init_sft_state(config, setup.model_config, setup.params, mesh=setup.mesh)
    warm = int(config.sft.warm_start_steps if warm_steps is None else warm_steps)
    state, m_warm = sft_loop(config, setup.model_config, state, optimizer, data, mesh=setup.mesh, steps=warm)
    acc_warm = held_out_results(config, setup, state.params)
    print(f"control: warm start ({warm} SFT steps) held-out accuracy {acc_warm['accuracy']:.3f}", flush=True)
    flops = {}
    if seconds is None:
        rl_width = length_bucket(max(len(p) for p in setup.train_prompt_ids))
        steps, flops = matched_sft_steps(config, grpo_steps, rl_width, data.input_ids.shape[1], trained_groups)
        flops.update(rl_prompt_width=rl_width, sft_width=int(data.input_ids.shape[1]))
    t0 = time.perf_counter()
    state, m_more = sft_loop(
        config,
        setup.model_config,
        state,
        optimizer,
        data,
        mesh=setup.mesh,
        start_step=warm,
        steps=10**9 if seconds is not None else steps,
        time_budget_s=seconds,
    )
    spent = time.perf_counter() - t0
    acc_more = held_out_results(config, setup, state.params)
    print(
        f"control: +{m_more['sft_steps']} SFT steps in {spent:.0f} s held-out accuracy {acc_more['accuracy']:.3f}",
        flush=True,
    )
    return {
        "warm_steps": warm,
        "accuracy_warm": acc_warm["accuracy"],
        "extra_sft_steps": m_more["sft_steps"],
        "extra_sft_seconds": spent,
        "accuracy_more_sft": acc_more["accuracy"],
        "num_scored": acc_more["num_scored"],
        **{f"{k}_warm": v for k, v in acc_warm.items() if k.startswith("ood_")},
        **{f"{k}_more_sft": v for k, v in acc_more.items() if k.startswith("ood_")},
        "sft_final_loss": m_more["sft_final_loss"],
        **flops,
    }


def main(_):
    config = _CONFIG.value
    out = _DEMO_DIR.value or config.output_dir
    summary = {}
    if _DEMO_DIR.value:
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    elif not (_NO_DEMO.value and _MATCH.value == "flops"):
        summary = train(config)
    warm = (summary.get("sft") or {}).get("sft_steps")
    if warm is None and config.sft.stop_accuracy:
        raise SystemExit("the warm start stops on a probe (config.sft.stop_accuracy): run the demo, or pass --demo_dir")
    if _MATCH.value == "wallclock":
        seconds, steps = grpo_seconds(out)
        ctrl = control(config, warm_steps=warm, seconds=seconds)
    else:
        if not config.rl.total_steps:
            raise SystemExit("--match=flops needs config.rl.total_steps (the GRPO steps to match)")
        steps, seconds = int(config.rl.total_steps), None
        trained = grpo_trained_groups(out) if summary else None  # --no_demo: every step's whole batch
        ctrl = control(config, warm_steps=warm, grpo_steps=steps, trained_groups=trained)
    result = {
        "accuracy_after_sft": summary.get("accuracy_start"),
        "accuracy_after_grpo": summary.get("accuracy_end"),
        "grpo_steps": steps,
        "grpo_seconds": seconds,
        "demo_wall_s": summary.get("wall_s"),
        **ctrl,
        "compute_matched_by": _MATCH.value,
    }
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"control_{_MATCH.value}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(
        f"held-out exact-call accuracy: after SFT {fmt(result['accuracy_after_sft'])}; "
        f"+GRPO ({steps} steps) {fmt(result['accuracy_after_grpo'])}; "
        f"+SFT instead ({ctrl['extra_sft_steps']} steps, {_MATCH.value}-matched) "
        f"{ctrl['accuracy_more_sft']:.3f}  [{path}]",
        flush=True,
    )


if __name__ == "__main__":
    _CONFIG = cli.define_config_flag()
    app.run(main)
