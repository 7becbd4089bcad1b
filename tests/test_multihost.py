"""Multi-host: the CLIs as 2 JAX processes x 4 virtual CPU devices on this machine, the
distributed runtime on localhost, exactly as `tpu_scripts/launch.py` starts them on a pod (its
`program_argv`) plus the flags a slice detects by itself (`local_process_flags`). Each result is
compared with the same config run here, in this one process, over the suite's 8 devices with the
same mesh shape. Compiled programs are shared between the runs through JAX's persistent cache."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import tooln1_jax.train as train_lib
from tooln1_jax import evaluate as evaluate_cli
from tooln1_jax import run_setup
from tooln1_jax.checkpoint import export_hf
from tooln1_jax.cli import parse_config_args
from tooln1_jax.metrics import read_jsonl
from tooln1_jax.sft import sft_baseline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_BANK = os.path.join(os.path.dirname(ROOT), "shared", "data", "api-bank", "level-1-api.json")


def _load_launch():
    sys.path.insert(0, os.path.join(ROOT, "tpu_scripts"))
    try:
        spec = importlib.util.spec_from_file_location("tpu_launch", os.path.join(ROOT, "tpu_scripts", "launch.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.pop(0)


launch = _load_launch()

CONFIG = "configs/tiny_cpu.py"
# The demo's pipeline at toy size: a 1-layer model, 2 SFT steps, 4 prompts x 4 samples of 8
# tokens per GRPO step, a held-out evaluation and a checkpoint every step. The entropy bonus and
# the KL term give every update a non-zero gradient while the toy model earns no reward, so every
# group trains (the demo's group filter would train none).
TOY = [
    "--config.data.synthetic.num_examples=200",
    "--config.model.random.hidden_size=32",
    "--config.model.random.intermediate_size=64",
    "--config.model.random.num_layers=1",
    "--config.model.random.num_heads=8",
    "--config.model.random.num_kv_heads=8",
    "--config.model.random.head_dim=8",
    "--config.sft.warm_start_steps=2",
    "--config.sft.batch_size=8",
    "--config.rl.train_batch_size=4",
    "--config.rl.mini_batch_size=2",
    "--config.rl.micro_batch_size=0",
    "--config.rl.rollout_batch_size=0",
    "--config.rl.filter_zero_std_groups=False",
    "--config.rl.entropy_coef=0.01",
    "--config.rl.kl_coef=0.01",
    "--config.rollout.num_samples=4",
    "--config.rollout.max_new_tokens=8",
    "--config.eval.num_examples=8",
    "--config.eval.batch_size=8",
    "--config.eval.max_new_tokens=8",
    "--config.eval.every_steps=1",
    "--config.checkpoint.every_steps=1",
    "--config.log.progress_bar=False",
    "--config.log.plot=False",
    "--config.model.random.max_position_embeddings=2048",  # room for API-Bank prompts in the evaluation test
]
DATA_FSDP = ["--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.mesh.tensor=1"]
# Devices are numbered process by process, so the last mesh axis crosses processes only when it
# is longer than one process's 4 devices: tensor=8 makes every tensor-parallel collective cross.
TENSOR = ["--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=8"]
COMPARED = (
    "reward_mean",
    "accuracy",
    "loss",
    "policy_loss",
    "kl",
    "entropy",
    "grad_norm",
    "ratio_mean",
    "ratio_max",
    "response_length",
    "zero_std_group_frac",
)
TIMEOUT = 900


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


class Processes:
    """N processes of one program (launch.py's argv), logs in files; `wait` returns exit codes."""

    def __init__(self, program: list[str], logs_dir, cache: str, extra=None, heartbeat_s: int = 60, n: int = 2):
        port = launch.free_port()
        env = {
            **launch.local_env(4),
            "JAX_COMPILATION_CACHE_DIR": cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.logs = [os.path.join(logs_dir, f"process_{i}.log") for i in range(n)]
        self.procs = []
        for i in range(n):
            flags = launch.local_process_flags(port, n, i)
            if program[1] != "tooln1_jax.train" and program[1] != "tooln1_jax.sft":  # argparse CLIs
                flags = [
                    "--distributed",
                    f"--coordinator-address=127.0.0.1:{port}",
                    f"--num-processes={n}",
                    f"--process-id={i}",
                    f"--heartbeat-timeout-s={heartbeat_s}",
                ]
            else:
                flags.append(f"--config.distributed.heartbeat_timeout_s={heartbeat_s}")
            argv = [sys.executable, *program, *flags, *((extra or {}).get(i, []))]
            with open(self.logs[i], "w", encoding="utf-8") as log:
                self.procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))

    def wait(self, timeout: float = TIMEOUT) -> list[int]:
        deadline = time.time() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(deadline - time.time(), 1)))
            except subprocess.TimeoutExpired:
                for q in self.procs:
                    q.kill()
                pytest.fail(f"processes still running after {timeout} s; logs: {self.tail()}")
        return codes

    def log(self, i: int) -> str:
        with open(self.logs[i], encoding="utf-8", errors="replace") as f:
            return f.read()

    def tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- process {i}:\n{self.log(i)[-chars:]}" for i in range(len(self.logs)))


def train_program(out_dir, mesh, total_steps: int) -> list[str]:
    return launch.program_argv(
        "tooln1_jax.train", CONFIG, str(out_dir), mesh, [*TOY, f"--config.rl.total_steps={total_steps}"]
    )


def one_process(out_dir, mesh, total_steps: int, module: str = "tooln1_jax.train"):
    """The same program's config, run in this process (8 devices)."""
    argv = launch.program_argv(module, CONFIG, str(out_dir), mesh, [*TOY, f"--config.rl.total_steps={total_steps}"])
    argv = [a for a in argv if a != "--config.distributed.enabled=True"]
    return parse_config_args(argv[1:])


def assert_rows_equal(got: list[dict], want: list[dict]):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for key in COMPARED:
            if key in w:
                np.testing.assert_allclose(g[key], w[key], rtol=2e-3, atol=1e-6, err_msg=f"step {w['step']} {key}")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """1 process x 8 devices, data 2 x fsdp 4: the uninterrupted 6-step run."""
    out = tmp_path_factory.mktemp("one_process")
    train_lib.train(one_process(out, DATA_FSDP, total_steps=6))
    return out


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, compile_cache):
    """2 processes x 4 devices, data 2 x fsdp 4: SFT warm start, then 3 GRPO steps."""
    out = tmp_path_factory.mktemp("two_process")
    run = Processes(train_program(out / "run", DATA_FSDP, 3), out, compile_cache)
    assert run.wait() == [0, 0], run.tail()
    return out / "run", run


def test_two_processes_train_like_one_resume_and_stop_when_a_peer_dies(
    two_process_run, reference_run, compile_cache, tmp_path
):
    run_dir, run = two_process_run
    want = read_jsonl(os.path.join(reference_run, "metrics.jsonl"))
    # Exactly one writer: process 0 wrote the logs; both took part in every checkpoint.
    assert sorted(os.listdir(run_dir)) == ["checkpoints", "eval.jsonl", "metrics.jsonl", "reference", "summary.json"]
    assert_rows_equal(read_jsonl(run_dir / "metrics.jsonl"), want[:3])
    assert [r["accuracy"] for r in read_jsonl(run_dir / "eval.jsonl")] == [
        r["accuracy"] for r in read_jsonl(reference_run / "eval.jsonl")
    ][:4]
    assert "held-out exact-call accuracy" in run.log(0) and "held-out exact-call accuracy" not in run.log(1)

    # Resume in 2 processes from step 3; kill -9 process 1 during step 5, once checkpoint 4 is complete.
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    heartbeat = 5
    killed = Processes(train_program(work, DATA_FSDP, 6), tmp_path, compile_cache, heartbeat_s=heartbeat)
    deadline = time.time() + TIMEOUT
    while not os.path.isdir(work / "checkpoints" / "4") and time.time() < deadline:
        assert killed.procs[0].poll() is None, killed.tail()
        time.sleep(0.2)
    killed.procs[1].send_signal(signal.SIGKILL)
    t_kill = time.time()
    code = killed.procs[0].wait(timeout=heartbeat + 60)
    waited = time.time() - t_kill
    log0 = killed.log(0)
    assert "resuming from" in log0 and log0.split("resuming from", 1)[1].split("\n", 1)[0].endswith("(step 3 of 6)")
    assert code != 0 and waited < heartbeat + 30, (code, waited)
    assert "stopped sending heartbeats" in log0 and "unhealthy" in log0, log0[-3000:]
    lost = log0.split("stopped sending heartbeats):", 1)[1].split()[0]
    assert lost == "1"  # the lost peer is named
    assert_rows_equal(read_jsonl(work / "metrics.jsonl")[:4], want[:4])  # step 4 after a resume from 3
    latest = max(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
    assert latest >= 4

    # The same command again resumes from the last complete checkpoint and ends like the uninterrupted run.
    again = Processes(train_program(work, DATA_FSDP, 6), tmp_path, compile_cache)
    assert again.wait() == [0, 0], again.tail()
    assert "resuming from" in again.log(0) and f"(step {latest} of 6)" in again.log(0)
    assert_rows_equal(read_jsonl(work / "metrics.jsonl"), want)


def test_a_tensor_axis_across_processes_trains_like_one_process(compile_cache, tmp_path):
    run = Processes(train_program(tmp_path / "two", TENSOR, 2), tmp_path, compile_cache)
    train_lib.train(one_process(tmp_path / "one", TENSOR, total_steps=2))
    assert run.wait() == [0, 0], run.tail()
    assert_rows_equal(read_jsonl(tmp_path / "two" / "metrics.jsonl"), read_jsonl(tmp_path / "one" / "metrics.jsonl"))


def test_sft_cli_in_two_processes_equals_one(compile_cache, tmp_path):
    program = launch.program_argv("tooln1_jax.sft", CONFIG, str(tmp_path / "two"), DATA_FSDP, TOY)
    run = Processes(program, tmp_path, compile_cache)
    sft_baseline(one_process(tmp_path / "one", DATA_FSDP, 1, module="tooln1_jax.sft"))
    assert run.wait() == [0, 0], run.tail()
    two = json.load(open(tmp_path / "two" / "sft_summary.json"))
    one = json.load(open(tmp_path / "one" / "sft_summary.json"))
    np.testing.assert_allclose(two["sft_losses"], one["sft_losses"], rtol=1e-5)
    assert two["accuracy"] == one["accuracy"]


def test_evaluate_and_export_in_two_processes_equal_one(two_process_run, compile_cache, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    run_dir, _ = two_process_run
    evaluation = [
        "-m",
        "tooln1_jax.evaluate",
        "api_bank",
        "--checkpoint",
        str(run_dir),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--data",
        API_BANK,
        "--limit",
        "8",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "8",
        "--no-progress",
    ]
    tokenizer = run_setup.build_tokenizer(one_process(tmp_path, DATA_FSDP, 1))
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "e2").mkdir()
    run = Processes([*evaluation, "--output", str(tmp_path / "eval_two")], tmp_path / "e2", compile_cache)
    evaluate_cli.run([*evaluation[2:], "--output", str(tmp_path / "eval_one")])
    assert run.wait() == [0, 0], run.tail()
    two = json.load(open(tmp_path / "eval_two" / "summary.json"))
    one = json.load(open(tmp_path / "eval_one" / "summary.json"))
    assert {k: v for k, v in two.items() if k != "run"} == {k: v for k, v in one.items() if k != "run"}
    assert two["run"]["prompt_too_long"] < 8  # some prompts were really generated for

    (tmp_path / "x2").mkdir()
    export = Processes(
        ["-m", "tooln1_jax.export", str(run_dir), str(tmp_path / "hf_two")], tmp_path / "x2", compile_cache
    )
    export_hf(str(run_dir), str(tmp_path / "hf_one"))
    assert export.wait() == [0, 0], export.tail()
    ids = torch.tensor([[3, 17, 250, 9, 1024, 77]])
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(tmp_path / d).eval()(ids).logits for d in ("hf_two", "hf_one")]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_a_setup_failure_on_one_host_stops_every_host_with_its_error(compile_cache, tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    t0 = time.time()
    run = Processes(
        train_program(tmp_path / "run", DATA_FSDP, 1),
        tmp_path,
        compile_cache,
        extra={1: ["--config.tokenizer.kind=hf", f"--config.tokenizer.name_or_path={missing}"]},
    )
    codes = run.wait(timeout=300)
    assert codes[0] != 0 and codes[1] != 0, run.tail()
    assert time.time() - t0 < 120
    assert "process 1 failed during data setup" in run.log(0) and str(missing) in run.log(0), run.tail()
    assert str(missing) in run.log(1)
