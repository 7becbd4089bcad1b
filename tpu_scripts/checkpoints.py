"""Copy a run's orbax checkpoints between a local output_dir and the bucket.

    python tpu_scripts/checkpoints.py pull --bucket gs://my-bucket --run tool_n1_qwen2_5_7b \\
        --local-dir runs/7b --step 140 --dry-run
    python tpu_scripts/checkpoints.py push --bucket gs://my-bucket --run sft_warm_start --local-dir runs/sft --dry-run

Both sides use the trainer's layout: <output_dir>/checkpoints/<step>, with output_dir
<bucket>/runs/<run> in the bucket (what launch.py --bucket sets). `gcloud storage rsync
--recursive` copies only what differs, so an interrupted copy resumes. --step picks one
checkpoint; without it every kept checkpoint is copied. With --name/--zone the copy runs on a
TPU worker (default 0) instead of here, e.g. for a single-host run that wrote to local disk.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from common import UsageError, add_dry_run, check_bucket, check_run, main_for, run_dir, ssh_all


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=("push", "pull"), help="push: local -> bucket; pull: bucket -> local")
    p.add_argument("--bucket", required=True, help="gs://bucket[/prefix]")
    p.add_argument("--run", required=True, help="run name (the bucket folder <bucket>/runs/<run>)")
    p.add_argument("--local-dir", required=True, help="the local output_dir (holds checkpoints/<step>)")
    p.add_argument("--step", type=int, default=None, help="one checkpoint step (default: all)")
    p.add_argument("--name", default=None, help="run the copy on this TPU VM instead of locally")
    p.add_argument("--zone", default=None, help="zone of --name")
    p.add_argument("--project", default=None, help="project of --name")
    p.add_argument("--worker", default="0", help="worker that runs the copy, with --name")
    add_dry_run(p)
    return p


def build_commands(args) -> list[list[str]]:
    bucket = check_bucket(args.bucket)
    if args.step is not None and args.step < 0:
        raise UsageError(f"--step={args.step}: must be >= 0")
    if not args.local_dir:
        raise UsageError("--local-dir is empty")
    suffix = "checkpoints" if args.step is None else f"checkpoints/{args.step}"
    remote = f"{run_dir(bucket, check_run(args.run))}/{suffix}"
    local = f"{args.local_dir.rstrip('/')}/{suffix}"
    src, dst = (local, remote) if args.direction == "push" else (remote, local)
    copy = ["gcloud", "storage", "rsync", "--recursive", src, dst]
    prepare = ["mkdir", "-p", local]  # rsync needs the local side to exist (source or destination)
    if args.name is None:
        if args.zone or args.project:
            raise UsageError("--zone/--project only apply with --name (a copy run on a TPU worker)")
        return [prepare, copy]
    if not args.zone:
        raise UsageError("--name needs --zone")
    if not (args.worker == "all" or args.worker.isdigit()):
        raise UsageError(f"--worker={args.worker!r}: a worker index (0, 1, ...) or 'all'")
    return [ssh_all(args, f"{shlex.join(prepare)} && {shlex.join(copy)}", worker=args.worker)]


if __name__ == "__main__":
    sys.exit(main_for(build_parser(), build_commands))
