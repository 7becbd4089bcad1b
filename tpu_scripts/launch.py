"""Start a training config on every worker of a slice at once, in the background.

    python tpu_scripts/launch.py --name tooln1-7b --zone us-east5-a --accelerator-type v5p-64 \\
        --config configs/tool_n1_qwen2_5_7b.py --bucket gs://my-bucket \\
        --mesh-data 1 --mesh-fsdp 8 --mesh-tensor 4 --dry-run -- --config.rl.micro_batch_size=8

One `tpu-vm ssh --worker=all` runs, on each worker, `nohup python -m tooln1_jax.train
--config=... --config.output_dir=... --config.distributed.enabled=True ...` (every process calls
`jax.distributed.initialize()`; on a TPU slice it finds its peers by itself). Each worker logs to
$HOME/tooln1-logs/<run>/<hostname>.log and keeps the process id beside it (<hostname>.pid) for
stop.py. Extra `--config.*=value` overrides go after `--`.

A multi-host slice needs a gs:// output_dir: orbax writes one checkpoint from all hosts together.

`--local-processes N` runs the same program as N processes on this machine instead, each with
`--devices-per-process` virtual CPU devices and the coordinator on 127.0.0.1 (the flags a TPU
slice detects by itself are passed explicitly): the pod path, tried on a laptop. Logs go to
<output_dir>/process_<i>.log; the exit status is the first non-zero one.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import socket
import subprocess
import sys

from common import (
    DEFAULT_REMOTE_DIR,
    DEFAULT_VENV,
    LOG_ROOT,
    UsageError,
    add_dry_run,
    add_target_args,
    check_bucket,
    check_name,
    check_remote_dir,
    check_run,
    main_for,
    parse_accelerator,
    run_dir,
    ssh_all,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("tooln1_jax.train", "tooln1_jax.sft")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_args(p, required=False)
    p.add_argument(
        "--local-processes",
        type=int,
        default=0,
        help="run N processes on this machine (no TPU): the multi-host path on one machine",
    )
    p.add_argument("--devices-per-process", type=int, default=4, help="virtual CPU devices of each local process")
    p.add_argument("--port", type=int, default=0, help="coordinator port of a local run (default: a free one)")
    p.add_argument("--config", required=True, help="config file, relative to the repository root (configs/...py)")
    p.add_argument(
        "--run", default=None, help="run name: log folder and bucket folder (default: the config's file name)"
    )
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--bucket", help="gs://bucket[/prefix]; output_dir becomes <bucket>/runs/<run>")
    out.add_argument("--output-dir", help="explicit config.output_dir (gs:// for a multi-host slice)")
    p.add_argument(
        "--accelerator-type", default=None, help="the slice's type, to check the mesh and output_dir against it"
    )
    for axis in ("data", "fsdp", "tensor"):
        p.add_argument(f"--mesh-{axis}", type=int, default=None, help=f"config.mesh.{axis} (-1: the remaining devices)")
    p.add_argument("--module", default=MODULES[0], choices=MODULES, help="the program to run")
    p.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR, help="checkout folder on each worker, under $HOME")
    p.add_argument("--local-repo", default=REPO_ROOT, help="checkout used to check that --config exists")
    add_dry_run(p)
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="-- --config.a.b=value ...")
    return p


def _check_config_path(config: str, local_repo: str) -> str:
    path = config.split(":", 1)[0]  # ml_collections allows "file.py:argument"
    if os.path.isabs(path) or ".." in path.split("/") or not path.endswith(".py"):
        raise UsageError(
            f"--config={config!r}: give a .py file relative to the repository root, e.g. configs/tool_n1_qwen2_5_7b.py"
        )
    if not os.path.isfile(os.path.join(local_repo, path)):
        raise UsageError(f"--config={config!r}: no such file in {local_repo} (the workers run the same checkout)")
    return config


def _check_mesh(args, chips: int | None) -> list[str]:
    sizes = {a: getattr(args, f"mesh_{a}") for a in ("data", "fsdp", "tensor")}
    for axis, v in sizes.items():
        if v is not None and (v == 0 or v < -1):
            raise UsageError(f"--mesh-{axis}={v}: sizes are positive, or -1 for the remaining devices")
    given = [v for v in sizes.values() if v is not None]
    if given.count(-1) > 1:
        raise UsageError("at most one --mesh-* size may be -1")
    if chips is not None and len(given) == 3:
        fixed = math.prod(v for v in given if v != -1)
        described = " x ".join(f"{a}={v}" for a, v in sizes.items())
        if (-1 in given and chips % fixed) or (-1 not in given and fixed != chips):
            raise UsageError(
                f"mesh {described} does not fit the {chips} chips of --accelerator-type={args.accelerator_type}"
            )
    return [f"--config.mesh.{a}={v}" for a, v in sizes.items() if v is not None]


def program_argv(module: str, config: str, output_dir: str, mesh_flags: list[str], overrides: list[str]) -> list[str]:
    """The program every process runs (after the interpreter): the same on a slice and locally."""
    return [
        "-m",
        module,
        f"--config={config}",
        f"--config.output_dir={output_dir}",
        "--config.distributed.enabled=True",
        *mesh_flags,
        *overrides,
    ]


def local_process_flags(port: int, num_processes: int, process_id: int) -> list[str]:
    """What a TPU slice detects by itself, given explicitly to local process `process_id`."""
    return [
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        f"--config.distributed.num_processes={num_processes}",
        f"--config.distributed.process_id={process_id}",
    ]


def local_env(devices_per_process: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(args) -> list[str]:
    overrides = list(args.overrides)
    if overrides[:1] == ["--"]:
        overrides = overrides[1:]
    for o in overrides:
        if not (o.startswith("--config.") and "=" in o):
            raise UsageError(f"override {o!r}: extra arguments after -- must look like --config.a.b=value")
    return overrides


def build_local_commands(args) -> list[list[str]]:
    """One argv per local process (see the module docstring)."""
    if args.local_processes < 1 or args.devices_per_process < 1:
        raise UsageError("--local-processes and --devices-per-process must be >= 1")
    if not args.output_dir or args.bucket:
        raise UsageError("--local-processes needs --output-dir (a local folder), not --bucket")
    config = _check_config_path(args.config, args.local_repo)
    program = program_argv(args.module, config, args.output_dir, _check_mesh(args, None), _overrides(args))
    port = args.port or free_port()
    return [
        [sys.executable, *program, *local_process_flags(port, args.local_processes, i)]
        for i in range(args.local_processes)
    ]


def run_local(args) -> int:
    """Starts every local process, waits for all, and returns the first non-zero exit status."""
    commands = build_local_commands(args)
    if args.dry_run:
        for cmd in commands:
            print(shlex.join(cmd))
        return 0
    os.makedirs(args.output_dir, exist_ok=True)
    procs = []
    for i, cmd in enumerate(commands):
        log = open(os.path.join(args.output_dir, f"process_{i}.log"), "w", encoding="utf-8")
        procs.append(
            (
                subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=args.local_repo,
                    env=local_env(args.devices_per_process),
                ),
                log,
            )
        )
        print(f"process {i}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    codes = [proc.wait() for proc, _ in procs]
    for _, log in procs:
        log.close()
    print(f"exit statuses {codes}; logs in {args.output_dir}/process_<i>.log", file=sys.stderr)
    return next((c for c in codes if c), 0)


def build_commands(args) -> list[list[str]]:
    for flag, value in (("--name", args.name), ("--zone", args.zone)):
        if not value:
            raise UsageError(f"{flag} is required (or --local-processes N to run on this machine)")
    check_name("--name", args.name)
    config = _check_config_path(args.config, args.local_repo)
    run = check_run(args.run or os.path.splitext(os.path.basename(config.split(":", 1)[0]))[0])
    accel = parse_accelerator(args.accelerator_type) if args.accelerator_type else None
    if args.bucket:
        output_dir = run_dir(check_bucket(args.bucket), run)
    else:
        output_dir = args.output_dir
        if output_dir.startswith("gs://"):
            check_bucket(output_dir, "--output-dir")
        elif accel is not None and accel.multi_host:
            raise UsageError(
                f"--output-dir={output_dir!r}: {accel.name} is multi-host, "
                "so checkpoints need a shared gs:// output_dir"
            )
    argv = [
        f"$HOME/{DEFAULT_VENV}/bin/python",
        *program_argv(
            args.module, config, output_dir, _check_mesh(args, accel.chips if accel else None), _overrides(args)
        ),
    ]
    python = f'"{argv[0]}" ' + shlex.join(argv[1:])  # $HOME expands on the worker
    logs = f"{LOG_ROOT}/{run}"
    remote = (
        f'mkdir -p "{logs}" && cd "$HOME/{check_remote_dir(args.remote_dir)}" && '
        f'{{ nohup {python} > "{logs}/$(hostname).log" 2>&1 < /dev/null & echo $! > "{logs}/$(hostname).pid"; }}'
    )
    return [ssh_all(args, remote)]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.local_processes:
        return main_for(parser, build_commands, argv)
    try:
        return run_local(args)
    except UsageError as e:
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
