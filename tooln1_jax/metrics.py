"""Run logs: one JSON line per step (always), TensorBoard scalars (optional, tensorboardX), a
tqdm progress bar, and a reward-curve PNG at the end (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
CURVE_FILE = "reward_curve.png"


def _clean(value: Any) -> Any:
    """JSON-safe scalars: numpy/jax numbers -> float/int, non-finite floats -> strings."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines log. A last line that is not JSON (a writer died mid-line) is
    dropped with a warning; a bad line before it raises ValueError naming the file and line."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    rows = []
    for i, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if i + 1 < len(lines):
                raise ValueError(f"{path}:{number}: not a JSON line ({e})") from None
            warnings.warn(f"{path}:{number}: dropped a torn last line {line[:80]!r}", RuntimeWarning, stacklevel=2)
    return rows


def _truncate_after(path: str, step: int) -> None:
    """Drops lines logged after `step` (by a run that died before its next checkpoint);
    a fresh run (step 0) starts the file anew."""
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step] if step else []
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


class MetricsLogger:
    """Appends step metrics to `<output_dir>/metrics.jsonl` and held-out results to `eval.jsonl`.
    Resuming at `start_step` first drops lines beyond it, so the files read as one run."""

    def __init__(
        self,
        output_dir: str,
        *,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = False,
        progress_bar: bool = True,
        is_main: bool = True,
    ):
        self.output_dir = output_dir
        self.is_main = is_main
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.eval_path = os.path.join(output_dir, EVAL_FILE)
        self.writer = None
        self.bar = None
        if not is_main:
            return
        os.makedirs(output_dir, exist_ok=True)
        for path in (self.path, self.eval_path):
            _truncate_after(path, start_step)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1)
        if progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="grpo", unit="step", dynamic_ncols=True)

    def _write(self, path: str, step: int, metrics: dict, prefix: str) -> dict:
        row = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        if not self.is_main:
            return row
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)
        return row

    def log_step(self, step: int, metrics: dict) -> dict:
        row = self._write(self.path, step, metrics, "train")
        if self.bar is not None:
            self.bar.update(1)
            shown = {k: row[k] for k in ("reward_mean", "accuracy", "kl") if isinstance(row.get(k), float)}
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()}, refresh=False)
        return row

    def log_eval(self, step: int, metrics: dict) -> dict:
        row = self._write(self.eval_path, step, metrics, "eval")
        if self.bar is not None:
            self.bar.write(
                f"step {step}: held-out "
                + ", ".join(
                    f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "step"
                )
            )
        return row

    def close(self, plot: bool = True) -> str | None:
        """Closes the writers; with `plot`, writes the reward curve and returns its path."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if plot and self.is_main:
            return plot_reward_curve(self.output_dir)
        return None


def plot_reward_curve(output_dir: str) -> str | None:
    """Training reward (and its running mean) per step, plus held-out accuracy when logged.
    Returns the PNG path, or None when no step was logged."""
    rows = read_jsonl(os.path.join(output_dir, METRICS_FILE))
    if not rows:
        return None
    # A bare Figure (no pyplot) draws off-screen without switching the process-wide backend,
    # which would break plt.show() in a notebook that calls this.
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    reward = [float(r.get("reward_mean", float("nan"))) for r in rows]
    window = max(1, len(reward) // 10)
    smooth = [
        sum(reward[max(0, i - window + 1) : i + 1]) / len(reward[max(0, i - window + 1) : i + 1])
        for i in range(len(reward))
    ]
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.subplots()
    ax.plot(steps, reward, color="tab:blue", alpha=0.35, label="train reward (mean over rollouts)")
    ax.plot(steps, smooth, color="tab:blue", label=f"train reward, running mean of {window}")
    evals = [r for r in read_jsonl(os.path.join(output_dir, EVAL_FILE)) if "accuracy" in r]
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["accuracy"] for r in evals],
            "o-",
            color="tab:red",
            label="held-out exact-call accuracy (greedy)",
        )
    ax.set_xlabel("GRPO step (rollout batch)")
    ax.set_ylabel("reward / accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out_path = os.path.join(output_dir, CURVE_FILE)
    fig.savefig(out_path)
    return out_path
