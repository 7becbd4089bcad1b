"""Every command the README shows is exercised: run for real where cheap (TPU dry runs, the SFT
CLI at toy size), parsed and validated otherwise; the Quickstart pair is what CI runs (the demo at
toy size in a fresh virtualenv, `.ci/fresh_install_smoke.sh`, whose commands are checked here)."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [
        line.strip() for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")
    ]


COMMANDS = readme_commands()


def test_quickstart_has_exactly_the_two_commands_and_ci_runs_both():
    assert COMMANDS[:2] == ["pip install -e . && python -m tooln1_jax.train", "bash tests/run_tests.sh"]
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    # the demo on a fresh base install first (its commands are checked below), then the test command
    assert 0 <= ci.index("bash .ci/fresh_install_smoke.sh") < ci.index("bash tests/run_tests.sh")
    # The demo command runs configs/tiny_cpu.py; tests/test_train_e2e.py runs that config end to end.
    from tooln1_jax import cli

    assert cli.default_config_path() == os.path.join(ROOT, "configs", "tiny_cpu.py")


# What the smoke may change in the demo's config: its size and where it writes, nothing else.
TOY_SIZE_KNOBS = {
    "output_dir",
    "data.synthetic.num_examples",
    "sft.warm_start_steps",
    "sft.batch_size",
    "rl.total_steps",
    "rl.train_batch_size",
    "rl.rollout_batch_size",
    "rl.mini_batch_size",
    "rl.micro_batch_size",
    "rollout.num_samples",
    "rollout.max_new_tokens",
    "eval.every_steps",
    "eval.num_examples",
    "eval.batch_size",
    "eval.max_new_tokens",
    "log.progress_bar",
}


def smoke_commands() -> list[str]:
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, ".ci", "fresh_install_smoke.sh"), "--print-commands"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_ci_smoke_runs_the_quickstart_demo_at_toy_size(tmp_path):
    from tooln1_jax.cli import parse_config_args
    from tooln1_jax.config import validate_config
    from tooln1_jax.evaluate import build_parser, main

    demo, evaluate, sft_help = smoke_commands()
    # exactly the README's first command, then `--config.<knob>=value` overrides of its default config
    assert demo.startswith(COMMANDS[0] + " ")
    overrides = shlex.split(demo[len(COMMANDS[0]) :])
    assert overrides and all(re.fullmatch(r"--config\.[a-z_.]+=\S+", o) for o in overrides), overrides
    knobs = [o[len("--config.") :].split("=")[0] for o in overrides]
    assert len(set(knobs)) == len(knobs) and set(knobs) <= TOY_SIZE_KNOBS, set(knobs) - TOY_SIZE_KNOBS
    config = validate_config(parse_config_args(["tooln1_jax.train", *overrides]))
    assert 1 <= config.sft.warm_start_steps <= 5 and 1 <= config.rl.total_steps <= 5
    assert config.eval.num_examples <= 16 and config.output_dir.startswith("$WORK/")
    # the other two: the API-Bank scoring of a small file (run here too: it takes a second), and sft --help
    argv = shlex.split(evaluate)
    assert argv[:4] == ["python", "-m", "tooln1_jax.evaluate", "api_bank"] and argv[-2:] == ["--output", "$WORK/eval"]
    predictions = os.path.join(ROOT, build_parser().parse_args(argv[3:]).predictions)
    out = tmp_path / "eval"
    assert (
        main([os.path.join(ROOT, a) if a.endswith(".jsonl") else a for a in argv[3:-2]] + ["--output", str(out)]) == 0
    )
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    written = [json.loads(line)["completion"] for line in open(predictions, encoding="utf-8")]
    assert [r["completion"] for r in results] == written and sum(r["valid"] for r in results) == 3
    assert sft_help == "python -m tooln1_jax.sft --help"


def _argv(command: str) -> list[str]:
    return shlex.split(command)


@pytest.mark.parametrize("command", [c for c in COMMANDS[2:]])
def test_readme_command_is_exercised(command, tmp_path):
    argv = _argv(command)
    assert argv[0] == "python", f"README command not covered by this test: {command}"
    if argv[1] == "-m" and argv[2] in ("tooln1_jax.train", "tooln1_jax.sft"):
        from tooln1_jax.cli import parse_config_args
        from tooln1_jax.config import validate_config

        config = parse_config_args([argv[2], *argv[3:]])
        validate_config(config)
        if argv[2] == "tooln1_jax.sft":  # cheap enough to run for real at toy size
            out = tmp_path / "sft"
            overrides = [
                f"--config.output_dir={out}",
                "--config.sft.warm_start_steps=2",
                "--config.eval.num_examples=4",
                "--config.log.progress_bar=False",
                "--config.data.synthetic.num_examples=60",
            ]
            proc = subprocess.run(
                [sys.executable, *argv[1:], *overrides],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=600,
                env={**os.environ, "XLA_FLAGS": ""},
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert (out / "sft_summary.json").exists()
    elif argv[1] == "-m" and argv[2] == "tooln1_jax.evaluate":
        from tooln1_jax.evaluate import build_parser

        args = build_parser().parse_args(argv[3:])
        assert args.checkpoint or args.predictions
    elif argv[1].startswith("tpu_scripts/"):
        assert "--dry-run" in argv, command
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        if "--local-processes" in argv:  # one local process per line, each the pod's program
            lines = proc.stdout.splitlines()
            assert len(lines) == int(argv[argv.index("--local-processes") + 1])
            assert all(" -m tooln1_jax." in line and "--config.distributed.process_id=" in line for line in lines)
        else:
            assert "gcloud" in proc.stdout
    elif argv[1].startswith("benchmarks/"):
        # Benchmarks are not run in the suite (minutes each); their flags must exist.
        proc = subprocess.run(
            [sys.executable, argv[1], "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "XLA_FLAGS": ""},
        )
        # argparse exits 0 after --help; absl (demo_control.py) exits 1 after printing its flags.
        assert proc.returncode == 0 or (proc.returncode == 1 and "flags:" in proc.stdout), proc.stderr[-3000:]
        for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
            assert flag in proc.stdout, f"{argv[1]} has no flag {flag}"
    else:
        pytest.fail(f"README command not covered by this test: {command}")
