"""The TPU scripts: each runs as a subprocess with --dry-run and its printed commands are checked
argument by argument; the shell commands they send to the workers are run here with bash in a
fake $HOME (so their quoting, nohup/pid handling and log paths are real); without --dry-run the
same argv reaches a stand-in `gcloud` on PATH."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "tpu_scripts")
ZONE = "us-east5-a"
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]


def run_script(script, *args, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, f"{script}.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def dry(script, *args):
    """The commands a script would run, each as its argv list."""
    r = run_script(script, "--dry-run", *args)  # first: after "--" it would be a config override
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines()]


def fails(script, *args):
    r = run_script(script, "--dry-run", *args)
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    return r.stderr.strip().splitlines()[-1]


def remote_command(ssh_argv):
    (flag,) = [a for a in ssh_argv if a.startswith("--command=")]
    return flag[len("--command=") :]


# ----------------------------------------------------------------------------- create / teardown


@pytest.mark.parametrize(
    "accel, runtime",
    [
        ("v4-64", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-128", "v2-alpha-tpuv5"),
        ("v6e-64", "v2-alpha-tpuv6e"),
    ],
)
def test_create_picks_the_runtime_version_per_generation(accel, runtime):
    assert dry("create", "--name", "tooln1", "--zone", ZONE, "--accelerator-type", accel) == [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "tooln1",
            f"--zone={ZONE}",
            f"--accelerator-type={accel}",
            f"--version={runtime}",
        ]
    ]


def test_create_queued_resource_spot_with_project_and_runtime_override():
    assert dry(
        "create",
        "--name",
        "tooln1-7b",
        "--zone",
        ZONE,
        "--project",
        "my-proj",
        "--accelerator-type",
        "v5p-64",
        "--queued",
        "--spot",
    ) == [
        [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "create",
            "tooln1-7b",
            f"--zone={ZONE}",
            "--project=my-proj",
            "--node-id=tooln1-7b",
            "--accelerator-type=v5p-64",
            "--runtime-version=v2-alpha-tpuv5",
            "--spot",
        ]
    ]
    (cmd,) = dry(
        "create",
        "--name",
        "t",
        "--zone",
        ZONE,
        "--accelerator-type",
        "v4-8",
        "--preemptible",
        "--runtime-version",
        "tpu-vm-base",
    )
    assert cmd[-2:] == ["--version=tpu-vm-base", "--preemptible"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--accelerator-type", "v3-8"], "unsupported TPU generation 'v3'"),
        (["--accelerator-type", "v5e-16"], "gcloud names v5e slices 'v5litepod-16'"),
        (["--accelerator-type", "v5p-12"], "multiples of 8"),
        (["--accelerator-type", "v6e-12"], "slices have (1, 4, 8, 16, 32, 64, 128, 256) chips"),
        (["--accelerator-type", "h100"], "is not an accelerator type"),
        (["--accelerator-type", "v5p-64", "--queued", "--preemptible"], "not a queued-resource option"),
        (["--accelerator-type", "v5p-64", "--spot", "--preemptible"], "exclusive"),
    ],
)
def test_create_rejects_bad_input_naming_the_flag(args, message):
    assert message in fails("create", "--name", "t", "--zone", ZONE, *args)


def test_names_and_zones_are_validated():
    assert "--name='My_TPU'" in fails("create", "--name", "My_TPU", "--zone", ZONE, "--accelerator-type", "v4-8")
    assert "--zone='us-east5'" in fails("create", "--name", "t", "--zone", "us-east5", "--accelerator-type", "v4-8")
    assert "--zone" in fails("create", "--name", "t", "--accelerator-type", "v4-8")  # argparse: required


def test_teardown_deletes_the_vm_or_the_queued_resource_with_its_nodes():
    assert dry("teardown", "--name", "tooln1", "--zone", ZONE) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "tooln1", f"--zone={ZONE}", "--quiet"]
    ]
    assert dry("teardown", "--name", "tooln1", "--zone", ZONE, "--project", "p1", "--queued") == [
        [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "delete",
            "tooln1",
            f"--zone={ZONE}",
            "--project=p1",
            "--force",
            "--quiet",
        ]
    ]


# ----------------------------------------------------------------------------- install


def test_install_clones_and_pip_installs_the_tpu_extra_on_every_worker():
    (cmd,) = dry(
        "install",
        "--name",
        "tooln1",
        "--zone",
        ZONE,
        "--repo-url",
        "https://example.com/o/tooln1-jax.git",
        "--ref",
        "v0.1",
    )
    assert cmd[:8] == SSH + ["tooln1", f"--zone={ZONE}", "--worker=all"] and len(cmd) == 9
    steps = remote_command(cmd).split(" && ")
    assert steps[:2] == [
        "sudo apt-get update -q",
        "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q git python3.11 python3.11-venv",
    ]
    assert (
        'else git clone --depth 1 --branch v0.1 https://example.com/o/tooln1-jax.git "$HOME/tooln1-jax"; fi'
        in remote_command(cmd)
    )
    assert 'python3.11 -m venv "$HOME/tooln1-venv"' in steps
    assert '"$HOME/tooln1-venv/bin/python" -m pip install -q -e ".[tpu]"' in steps
    assert steps[-1].endswith('-c "import jax; print(jax.process_index(), jax.device_count())"')


def test_install_from_local_ships_the_committed_head_to_all_workers(tmp_path):
    (tmp_path / ".git").mkdir()
    archive = str(tmp_path / "src.tar.gz")
    pack, copy, ssh = dry(
        "install",
        "--name",
        "tooln1",
        "--zone",
        ZONE,
        "--from-local",
        str(tmp_path),
        "--local-archive",
        archive,
        "--skip-apt",
    )
    assert pack == ["git", "-C", str(tmp_path), "archive", "--format=tar.gz", f"--output={archive}", "HEAD"]
    assert copy == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        archive,
        "tooln1:tooln1-jax-src.tar.gz",
        f"--zone={ZONE}",
        "--worker=all",
    ]
    assert "--worker=all" in ssh and "apt-get" not in remote_command(ssh)
    assert remote_command(ssh).startswith(
        'rm -rf "$HOME/tooln1-jax" && mkdir -p "$HOME/tooln1-jax" && '
        'tar -xzf "$HOME/tooln1-jax-src.tar.gz" -C "$HOME/tooln1-jax"'
    )


def test_install_from_local_archive_unpacks_the_committed_tree_on_a_worker(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "configs").mkdir(parents=True)
    (checkout / "configs" / "run.py").write_text("CONFIG = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(checkout)]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "x"]):
        subprocess.run(git + args, check=True, capture_output=True)
    (checkout / "uncommitted.txt").write_text("not shipped\n")
    archive = tmp_path / "src.tar.gz"
    pack, _, ssh = dry(
        "install",
        "--name",
        "t",
        "--zone",
        ZONE,
        "--from-local",
        str(checkout),
        "--local-archive",
        str(archive),
        "--skip-apt",
    )
    subprocess.run(pack, check=True, timeout=30)
    home = tmp_path / "home"
    home.mkdir()
    (home / "tooln1-jax-src.tar.gz").write_bytes(archive.read_bytes())  # what the scp step delivers
    unpack = remote_command(ssh).split(" && python3.11 -m venv")[0]  # rm, mkdir, tar
    subprocess.run(["bash", "-c", unpack], env={**os.environ, "HOME": str(home)}, check=True, timeout=30)
    assert (home / "tooln1-jax" / "configs" / "run.py").read_text() == "CONFIG = 1\n"
    assert not (home / "tooln1-jax" / "uncommitted.txt").exists()


def test_install_rejects_bad_sources(tmp_path):
    assert "not a git checkout" in fails("install", "--name", "t", "--zone", ZONE, "--from-local", str(tmp_path))
    assert "--remote-dir='../x'" in fails(
        "install", "--name", "t", "--zone", ZONE, "--repo-url", "u", "--remote-dir", "../x"
    )
    assert "--skip-apt" in fails(
        "install", "--name", "t", "--zone", ZONE, "--repo-url", "u", "--python", "/opt/py/bin/python"
    )
    assert "one of the arguments --repo-url --from-local is required" in fails("install", "--name", "t", "--zone", ZONE)


# ----------------------------------------------------------------------------- launch / logs / stop


@pytest.fixture
def repo_with_config(tmp_path):
    root = tmp_path / "checkout"
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "tool_n1_qwen2_5_7b.py").write_text("# stand-in config\n")
    return str(root)


CONFIG_AND_MESH = "--config configs/tool_n1_qwen2_5_7b.py --mesh-data 1 --mesh-fsdp 8 --mesh-tensor 4".split()
LAUNCH = ["--name", "tooln1-7b", "--zone", ZONE, "--accelerator-type", "v5p-64", *CONFIG_AND_MESH]
EXPECTED_PROGRAM = [
    "-m",
    "tooln1_jax.train",
    "--config=configs/tool_n1_qwen2_5_7b.py",
    "--config.output_dir=gs://my-bucket/runs/tool_n1_qwen2_5_7b",
    "--config.distributed.enabled=True",
    "--config.mesh.data=1",
    "--config.mesh.fsdp=8",
    "--config.mesh.tensor=4",
    "--config.rl.micro_batch_size=8",
    "--config.data.xlam_path=data/xlam 60k.json",
]


def launch_argv(repo: str) -> list[str]:
    """`launch` of the 7B config to a bucket, with two overrides (one with a space)."""
    tail = ["--", "--config.rl.micro_batch_size=8", "--config.data.xlam_path=data/xlam 60k.json"]
    return ["launch", *LAUNCH, "--bucket", "gs://my-bucket", "--local-repo", repo, *tail]


def test_launch_starts_the_config_on_all_workers_with_distributed_init(repo_with_config):
    (cmd,) = dry(*launch_argv(repo_with_config))
    assert cmd[:8] == SSH + ["tooln1-7b", f"--zone={ZONE}", "--worker=all"] and len(cmd) == 9
    remote = remote_command(cmd)
    assert remote.startswith('mkdir -p "$HOME/tooln1-logs/tool_n1_qwen2_5_7b" && cd "$HOME/tooln1-jax" && { nohup ')
    python = remote.split("nohup ", 1)[1].split(" > ", 1)[0]
    assert shlex.split(python) == ["$HOME/tooln1-venv/bin/python", *EXPECTED_PROGRAM]  # quoting survives
    assert remote.endswith(
        '> "$HOME/tooln1-logs/tool_n1_qwen2_5_7b/$(hostname).log" 2>&1 < /dev/null & '
        'echo $! > "$HOME/tooln1-logs/tool_n1_qwen2_5_7b/$(hostname).pid"; }'
    )


def _fake_worker_home(tmp_path):
    """$HOME of a worker: the checkout folder and a venv `python` that records its argv, then
    stays alive (like a training process) until it is stopped."""
    home = tmp_path / "home"
    (home / "tooln1-jax").mkdir(parents=True)
    venv_bin = home / "tooln1-venv" / "bin"
    venv_bin.mkdir(parents=True)
    python = venv_bin / "python"
    python.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$HOME/argv.txt"\necho "step 1 reward 0.5"\nexec sleep 60\n')
    python.chmod(0o755)
    return home


def _wait_for(path, timeout=10.0):
    deadline = time.time() + timeout
    while not (os.path.exists(path) and os.path.getsize(path)) and time.time() < deadline:
        time.sleep(0.05)
    return os.path.exists(path)


def test_launch_logs_and_stop_commands_work_in_a_worker_shell(tmp_path, repo_with_config):
    home = _fake_worker_home(tmp_path)
    env = {**os.environ, "HOME": str(home)}
    (launch,) = dry(*launch_argv(repo_with_config))
    hostname = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    run_dir = home / "tooln1-logs" / "tool_n1_qwen2_5_7b"
    pid = None
    try:
        subprocess.run(["bash", "-c", remote_command(launch)], env=env, check=True, timeout=30)
        assert _wait_for(home / "argv.txt") and _wait_for(run_dir / f"{hostname}.log")
        assert (home / "argv.txt").read_text().splitlines() == EXPECTED_PROGRAM
        pid = int((run_dir / f"{hostname}.pid").read_text())
        os.kill(pid, 0)  # the background process outlived the launching shell

        (logs,) = dry(
            "logs", "--name", "tooln1-7b", "--zone", ZONE, "--run", "tool_n1_qwen2_5_7b", "--no-follow", "--lines", "5"
        )
        assert "--worker=0" in logs
        out = subprocess.run(["bash", "-c", remote_command(logs)], env=env, capture_output=True, text=True, timeout=30)
        assert out.stdout == "step 1 reward 0.5\n"

        (stop,) = dry("stop", "--name", "tooln1-7b", "--zone", ZONE, "--run", "tool_n1_qwen2_5_7b")
        assert "--worker=all" in stop
        out = subprocess.run(["bash", "-c", remote_command(stop)], env=env, capture_output=True, text=True, timeout=30)
        assert out.stdout == f"{hostname}: stopped\n"
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
                time.sleep(0.05)
            except ProcessLookupError:
                break
        else:
            pytest.fail("stop.py's command left the process running")
        out = subprocess.run(["bash", "-c", remote_command(stop)], env=env, capture_output=True, text=True, timeout=30)
        assert out.stdout == f"{hostname}: not running\n"
        pid = None
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_launch_with_explicit_output_dir_other_module_and_no_mesh(repo_with_config):
    (cmd,) = dry(
        "launch",
        "--name",
        "t",
        "--zone",
        ZONE,
        "--config",
        "configs/tool_n1_qwen2_5_7b.py",
        "--output-dir",
        "gs://my-bucket/exp/a",
        "--run",
        "sft-1",
        "--module",
        "tooln1_jax.sft",
        "--local-repo",
        repo_with_config,
    )
    python = remote_command(cmd).split("nohup ", 1)[1].split(" > ", 1)[0]
    assert shlex.split(python)[1:] == [
        "-m",
        "tooln1_jax.sft",
        "--config=configs/tool_n1_qwen2_5_7b.py",
        "--config.output_dir=gs://my-bucket/exp/a",
        "--config.distributed.enabled=True",
    ]
    assert "$HOME/tooln1-logs/sft-1/$(hostname).log" in remote_command(cmd)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--mesh-tensor", "8"],
            "mesh data=1 x fsdp=8 x tensor=8 does not fit the 32 chips of --accelerator-type=v5p-64",
        ),
        (["--mesh-tensor", "-1", "--mesh-data", "-1"], "at most one --mesh-* size may be -1"),
        (["--mesh-fsdp", "0"], "--mesh-fsdp=0"),
    ],
)
def test_launch_checks_the_mesh_against_the_slice(repo_with_config, args, message):
    base = [
        "--name",
        "t",
        "--zone",
        ZONE,
        "--accelerator-type",
        "v5p-64",
        "--config",
        "configs/tool_n1_qwen2_5_7b.py",
        "--bucket",
        "gs://my-bucket",
        "--local-repo",
        repo_with_config,
        "--mesh-data",
        "1",
        "--mesh-fsdp",
        "8",
        "--mesh-tensor",
        "4",
    ]
    assert message in fails("launch", *base, *args)


def test_launch_rejects_bad_output_config_and_overrides(repo_with_config):
    common = ["--name", "t", "--zone", ZONE, "--local-repo", repo_with_config]
    cfg = ["--config", "configs/tool_n1_qwen2_5_7b.py"]
    assert "multi-host, so checkpoints need a shared gs:// output_dir" in fails(
        "launch", *common, *cfg, "--accelerator-type", "v5p-64", "--output-dir", "runs/local"
    )
    assert "one of the arguments --bucket --output-dir is required" in fails("launch", *common, *cfg)
    assert "--bucket='my-bucket' is not a Cloud Storage location" in fails(
        "launch", *common, *cfg, "--bucket", "my-bucket"
    )
    assert "no such file" in fails("launch", *common, "--config", "configs/missing.py", "--bucket", "gs://my-bucket")
    assert "relative to the repository root" in fails(
        "launch", *common, "--config", "/abs/x.py", "--bucket", "gs://my-bucket"
    )
    assert "must look like --config.a.b=value" in fails(
        "launch", *common, *cfg, "--bucket", "gs://my-bucket", "--", "rl.lr=1"
    )
    # a single-host slice may write to its local disk
    (cmd,) = dry("launch", *common, *cfg, "--accelerator-type", "v6e-8", "--output-dir", "runs/local")
    assert "--config.output_dir=runs/local" in remote_command(cmd)


def test_logs_follow_all_workers_and_reject_a_bad_worker():
    (cmd,) = dry("logs", "--name", "t", "--zone", ZONE, "--run", "r1", "--worker", "all")
    assert cmd[-2:] == ["--worker=all", '--command=tail -n 100 -F "$HOME/tooln1-logs/r1/"*.log']
    assert "--worker='x'" in fails("logs", "--name", "t", "--zone", ZONE, "--run", "r1", "--worker", "x")
    assert "--run='a b'" in fails("logs", "--name", "t", "--zone", ZONE, "--run", "a b")


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoints_pull_and_push_mirror_the_trainer_layout():
    assert dry(
        "checkpoints", "pull", "--bucket", "gs://my-bucket", "--run", "r7b", "--local-dir", "runs/7b", "--step", "140"
    ) == [
        ["mkdir", "-p", "runs/7b/checkpoints/140"],
        [
            "gcloud",
            "storage",
            "rsync",
            "--recursive",
            "gs://my-bucket/runs/r7b/checkpoints/140",
            "runs/7b/checkpoints/140",
        ],
    ]
    assert dry(
        "checkpoints", "push", "--bucket", "gs://my-bucket/team/", "--run", "r7b", "--local-dir", "runs/7b/"
    ) == [
        ["mkdir", "-p", "runs/7b/checkpoints"],
        [
            "gcloud",
            "storage",
            "rsync",
            "--recursive",
            "runs/7b/checkpoints",
            "gs://my-bucket/team/runs/r7b/checkpoints",
        ],
    ]


def test_checkpoints_copy_can_run_on_a_worker():
    (cmd,) = dry(
        "checkpoints",
        "push",
        "--bucket",
        "gs://my-bucket",
        "--run",
        "r",
        "--local-dir",
        "out dir",
        "--name",
        "t",
        "--zone",
        ZONE,
        "--worker",
        "0",
    )
    assert cmd[:8] == SSH + ["t", f"--zone={ZONE}", "--worker=0"]
    prepare, copy = remote_command(cmd).split(" && ")
    assert shlex.split(prepare) == ["mkdir", "-p", "out dir/checkpoints"]
    assert shlex.split(copy) == [
        "gcloud",
        "storage",
        "rsync",
        "--recursive",
        "out dir/checkpoints",
        "gs://my-bucket/runs/r/checkpoints",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bucket", "s3://x-bucket"], "is not a Cloud Storage location"),
        (["--bucket", "gs://my-bucket", "--zone", ZONE], "--zone/--project only apply with --name"),
        (["--bucket", "gs://my-bucket", "--name", "t"], "--name needs --zone"),
        (["--bucket", "gs://my-bucket", "--step", "-1"], "--step=-1"),
    ],
)
def test_checkpoints_reject_bad_input(args, message):
    assert message in fails("checkpoints", "pull", "--run", "r", "--local-dir", "d", *args)


def test_checkpoints_need_a_bucket():
    assert "--bucket" in fails("checkpoints", "pull", "--run", "r", "--local-dir", "d")


# ----------------------------------------------------------------------------- real execution


@pytest.fixture
def fake_gcloud(tmp_path):
    """A `gcloud` on PATH that appends its argv (one JSON list per call) to a file and exits
    with $FAKE_GCLOUD_RC."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls.jsonl"
    script = bin_dir / "gcloud"
    script.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "sys.exit(int(os.environ.get('FAKE_GCLOUD_RC', '0')))\n"
    )
    script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return env, record


def test_without_dry_run_the_same_argv_reaches_gcloud(fake_gcloud):
    import json

    env, record = fake_gcloud
    args = ["--name", "tooln1", "--zone", ZONE, "--accelerator-type", "v6e-64", "--queued", "--spot"]
    r = run_script("create", *args, env=env)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    (expected,) = dry("create", *args)
    assert [json.loads(line) for line in record.read_text().splitlines()] == [expected[1:]]


def test_a_failing_command_stops_the_script_with_its_status(fake_gcloud):
    env, record = fake_gcloud
    r = run_script("teardown", "--name", "tooln1", "--zone", ZONE, env={**env, "FAKE_GCLOUD_RC": "3"})
    assert r.returncode == 3 and "exit status 3 from: gcloud compute tpus tpu-vm delete tooln1" in r.stderr


def test_missing_gcloud_is_reported(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no gcloud here
    r = run_script("teardown", "--name", "tooln1", "--zone", ZONE, env=env)
    assert r.returncode == 127 and "'gcloud' is not on PATH" in r.stderr


def test_launch_local_processes_run_the_workers_program_with_explicit_peers(repo_with_config):
    common = [*CONFIG_AND_MESH, "--local-repo", repo_with_config]
    overrides = ["--", "--config.rl.micro_batch_size=8"]
    (remote,) = dry(
        "launch", "--name", "t", "--zone", ZONE, *common, "--output-dir", "gs://my-bucket/runs/x", *overrides
    )
    worker = shlex.split(remote_command(remote).split("nohup ", 1)[1].split(" > ", 1)[0])[1:]
    local = dry(
        "launch",
        "--local-processes",
        "2",
        "--port",
        "12345",
        *common,
        "--output-dir",
        "gs://my-bucket/runs/x",
        *overrides,
    )
    assert len(local) == 2
    for i, cmd in enumerate(local):
        assert cmd[0] == sys.executable and cmd[1 : len(worker) + 1] == worker  # the worker's program, unchanged
        assert cmd[len(worker) + 1 :] == [
            "--config.distributed.coordinator_address=127.0.0.1:12345",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
        ]
    assert "--local-processes needs --output-dir" in fails(
        "launch", "--local-processes", "2", *common, "--bucket", "gs://my-bucket"
    )
    assert "--zone is required" in fails("launch", "--name", "t", *common, "--output-dir", "gs://my-bucket/x")
