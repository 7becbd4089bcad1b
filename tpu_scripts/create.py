"""Create a TPU VM slice, or a queued resource that becomes one when capacity frees up.

    python tpu_scripts/create.py --name tooln1-7b --zone us-east5-a --accelerator-type v5p-64 --spot --dry-run

The runtime (software) version follows the generation (v4: tpu-ubuntu2204-base, v5e:
v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e) unless --runtime-version is given.
"""

from __future__ import annotations

import argparse
import sys

from common import UsageError, add_dry_run, add_target_args, check_name, location_flags, main_for, parse_accelerator


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_args(p)
    p.add_argument("--accelerator-type", required=True, help="v4-64, v5p-64, v5p-128, v5litepod-16, v6e-64, ...")
    p.add_argument("--runtime-version", default=None, help="override the generation's default software version")
    p.add_argument(
        "--queued", action="store_true", help="request a queued resource (id = --name) instead of creating the VM now"
    )
    p.add_argument("--spot", action="store_true", help="Spot capacity (cheaper, can be preempted)")
    p.add_argument(
        "--preemptible", action="store_true", help="legacy preemptible VM (tpu-vm create only; prefer --spot)"
    )
    add_dry_run(p)
    return p


def build_commands(args) -> list[list[str]]:
    accel = parse_accelerator(args.accelerator_type)
    name = check_name("--name", args.name)
    runtime = args.runtime_version or accel.runtime_version
    if args.spot and args.preemptible:
        raise UsageError("--spot and --preemptible are exclusive; use --spot")
    if args.queued:
        if args.preemptible:
            raise UsageError("--preemptible is not a queued-resource option; use --spot")
        cmd = [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "create",
            name,
            *location_flags(args),
            f"--node-id={name}",
            f"--accelerator-type={accel.name}",
            f"--runtime-version={runtime}",
        ]
    else:
        cmd = [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            name,
            *location_flags(args),
            f"--accelerator-type={accel.name}",
            f"--version={runtime}",
        ]
    if args.spot:
        cmd.append("--spot")
    if args.preemptible:
        cmd.append("--preemptible")
    return [cmd]


if __name__ == "__main__":
    sys.exit(main_for(build_parser(), build_commands))
