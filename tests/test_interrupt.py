"""Ctrl-C and SIGTERM: real signals to a real `python -m tooln1_jax.train` process. It finishes
the step, saves a checkpoint (even with checkpoint.every_steps=0) and its summary, and exits with
128 + the signal; the same command then resumes and ends exactly like an uninterrupted run. A
second Ctrl-C stops at once. Also: the CLI's one-line errors and --help."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import tooln1_jax.train as train_lib
from tooln1_jax.cli import parse_config_args
from tooln1_jax.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = {"tokens_per_s", "rollout_tokens_per_s", "step_time", "rollout_time", "update_time"}
CONFIG_FILE = """
from tooln1_jax.config import default_config, validate_config


def get_config():
    c = default_config()
    c.data.synthetic.num_examples = 48
    c.rl.train_batch_size = 2
    c.rl.mini_batch_size = 1
    c.rl.total_steps = 12
    c.rollout.num_samples = 4
    c.rollout.max_new_tokens = 8
    c.optim.lr = 1e-3
    c.eval.num_examples = 0
    c.checkpoint.every_steps = 0
    c.sft.log_every = 1
    c.sft.max_completion_length = 96
    c.log.progress_bar = False
    c.log.plot = False
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return validate_config(c)
"""


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "interrupt_cpu.py"
    path.write_text(CONFIG_FILE)
    return str(path)


CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Reruns load their compiled programs from JAX's persistent cache instead of compiling again."""
    os.environ["TOOLN1_TEST_JAX_CACHE"] = str(tmp_path_factory.mktemp("jax_cache"))
    yield
    os.environ.pop("TOOLN1_TEST_JAX_CACHE")


def start(config_path, out_dir, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if "TOOLN1_TEST_JAX_CACHE" in env:
        env.update(CACHE_ENV, JAX_COMPILATION_CACHE_DIR=env["TOOLN1_TEST_JAX_CACHE"])
    return subprocess.Popen(
        [sys.executable, "-m", "tooln1_jax.train", f"--config={config_path}", f"--config.output_dir={out_dir}", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_rows(out_dir, proc, n, timeout=600):
    deadline = time.time() + timeout
    while len(read_jsonl(os.path.join(out_dir, "metrics.jsonl"))) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)


def rows(out_dir):
    return [
        {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    ]


@pytest.fixture(scope="module")
def uninterrupted(config_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train_lib.train(parse_config_args(["train", f"--config={config_path}", f"--config.output_dir={out}"]))
    return out


def test_sigterm_saves_once_and_the_rerun_equals_an_uninterrupted_run(
    config_path, uninterrupted, compile_cache, tmp_path
):
    out = tmp_path / "run"
    step = interrupt_run(start(config_path, out), out, signal.SIGTERM)
    rerun = start(config_path, out)
    stdout, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert f"resuming from {out / 'checkpoints'}/{step} (step {step} of 12)" in stdout
    assert rows(out) == rows(uninterrupted)


def interrupt_run(proc, out, signum) -> int:
    """Signals `proc` after its second step and checks what it leaves: one checkpoint at the step
    it stopped at, the summary, the exit status and the resume line. Returns that step."""
    wait_for_rows(out, proc, 2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted at step ") and line.endswith("run the same command again to resume"), err[
        -2000:
    ]
    step = int(line.split("interrupted at step ", 1)[1].split()[0])
    assert 2 <= step < 12
    assert sorted(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit()) == [step]  # saved once
    summary = json.load(open(out / "summary.json"))
    assert summary["interrupted"] is True and summary["steps_done"] == step
    assert len(rows(out)) == step
    return step


def test_ctrl_c_saves_once(config_path, compile_cache, tmp_path):
    interrupt_run(start(config_path, tmp_path / "run"), tmp_path / "run", signal.SIGINT)


def test_a_second_ctrl_c_stops_at_once_without_saving(config_path, compile_cache, tmp_path):
    out = tmp_path / "run"
    proc = start(config_path, out, "--config.rollout.max_new_tokens=256")  # steps long enough for two presses
    wait_for_rows(out, proc, 1)
    proc.send_signal(signal.SIGINT)
    while "stopping after this step" not in proc.stderr.readline():
        assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "stopped at once" in err.strip().splitlines()[-1]
    assert not os.path.exists(out / "summary.json")


def test_an_interrupted_warm_start_saves_and_the_rerun_finishes_it(config_path, compile_cache, tmp_path):
    out = tmp_path / "run"
    sft = ["--config.sft.warm_start_steps=400", "--config.sft.batch_size=2", "--config.rl.total_steps=1"]
    proc = start(config_path, out, *sft)
    deadline = time.time() + 600
    while proc.stdout.readline().startswith("sft step ") is False and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted during the SFT warm start after" in err, err[-2000:]
    done = int(err.split("interrupted during the SFT warm start after ", 1)[1].split()[0])
    assert 1 <= done < 400
    rerun = start(config_path, out, *sft, "--config.sft.warm_start_steps=" + str(done + 2))
    stdout, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert f"resuming the SFT warm start at step {done} of {done + 2}" in stdout
    assert json.load(open(out / "summary.json"))["sft"]["sft_steps"] == done + 2


def run_cli(*args, module="tooln1_jax.train"):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_line_and_help_exits_0(tmp_path):
    for module in ("tooln1_jax.train", "tooln1_jax.sft"):
        r = run_cli("--help", module=module)
        assert r.returncode == 0 and "--config.a.b=VALUE" in r.stdout, r.stderr
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {
        ("--config.rl.bogus=3",): "error: config.rl.bogus is not a config field",
        ("--config=configs/missing.py",): "error: --config configs/missing.py: no such config file",
        ("--config.rl.kl_coef=lots",): "error: flag --config.rl.kl_coef=lots",
        (f"--config.output_dir={a_file}",): f"error: config.output_dir={str(a_file)!r} is a file, not a folder",
        ("--config.rl.mini_batch_size=3",): "error: config.rl.mini_batch_size=3 must divide",
    }
    for args, message in cases.items():
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        lines = [
            line for line in r.stderr.splitlines() if line.strip() and not line.startswith(("I1", "W1", "WARNING"))
        ]
        assert len(lines) == 1 and lines[0].startswith(message), (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
    for module, args in (
        ("tooln1_jax.sft", [f"--config.output_dir={a_file}"]),
        ("tooln1_jax.evaluate", ["api_bank", "--predictions", str(a_file), "--output", str(a_file)]),
    ):
        r = run_cli(*args, module=module)  # an unusable output folder fails before any work
        assert r.returncode == 2 and f"{str(a_file)!r} is a file, not a folder" in r.stderr, r.stderr[-2000:]
    r = run_cli("--config.rl.bogus=3", "--verbose")
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_a_resume_with_a_different_config_warns_or_is_refused(config_path, uninterrupted, tmp_path):
    out = tmp_path / "run"
    r = run_cli(
        f"--config={config_path}",
        f"--config.output_dir={out}",
        "--config.rl.total_steps=2",
        "--config.checkpoint.every_steps=1",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    changed = ["--config.seed=5", "--config.optim.lr=0.002"]
    r = run_cli(
        f"--config={config_path}",
        f"--config.output_dir={out}",
        "--config.rl.total_steps=3",
        "--config.checkpoint.every_steps=1",
        *changed,
        "--config.resume.strict=True",
    )
    assert r.returncode == 2 and "config.seed: 0 in the checkpoint, 5 now" in r.stderr and "config.optim.lr" in r.stderr
    r = run_cli(
        f"--config={config_path}",
        f"--config.output_dir={out}",
        "--config.rl.total_steps=3",
        "--config.checkpoint.every_steps=1",
        *changed,
    )
    assert r.returncode == 0 and "warning: resuming with a config that differs" in r.stderr
