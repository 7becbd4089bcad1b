"""Shared pieces of the TPU scripts: accelerator types, runtime versions, gcloud argv builders,
argument validation, and the dry-run / execute switch.

Every script builds its gcloud commands as argv lists (never a shell string), so `--dry-run`
prints exactly what would run: one command per line, quoted with `shlex.join`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import shutil
import subprocess
import sys

# Software ("runtime") version per generation, from https://cloud.google.com/tpu/docs/runtimes
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

# Accelerator-type prefix -> generation. v4 and v5p names count TensorCores (2 per chip);
# v5e ("v5litepod-N") and v6e names count chips.
_PREFIXES = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v6e": "v6e"}
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
# Most chips one host (TPU VM) holds; a larger slice is multi-host.
_MAX_SINGLE_HOST_CHIPS = {"v4": 4, "v5p": 4, "v5e": 8, "v6e": 8}
_V5E_V6E_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)

LOG_ROOT = "$HOME/tooln1-logs"  # on each worker; one folder per run, one log per worker
DEFAULT_REMOTE_DIR = "tooln1-jax"  # the checkout on each worker, under $HOME
DEFAULT_VENV = "tooln1-venv"  # the virtual environment on each worker, under $HOME


class UsageError(ValueError):
    """Bad script input; the message names the flag and what is expected."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str  # as gcloud spells it: "v5p-64", "v5litepod-16"
    generation: str  # "v4" | "v5e" | "v5p" | "v6e"
    chips: int

    @property
    def runtime_version(self) -> str:
        return RUNTIME_VERSIONS[self.generation]

    @property
    def multi_host(self) -> bool:
        return self.chips > _MAX_SINGLE_HOST_CHIPS[self.generation]


def parse_accelerator(name: str) -> Accelerator:
    """'v5p-64' -> Accelerator(generation='v5p', chips=32). Raises UsageError naming the fix."""
    known = "v4-N / v5p-N (N = TensorCores, a multiple of 8), v5litepod-N / v6e-N (N = chips: 1, 4, 8, ..., 256)"
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name or "")
    if not m:
        raise UsageError(f"--accelerator-type={name!r} is not an accelerator type; expected {known}")
    prefix, size = m.group(1), int(m.group(2))
    if prefix == "v5e":
        raise UsageError(f"--accelerator-type={name!r}: gcloud names v5e slices 'v5litepod-{size}'")
    if prefix not in _PREFIXES:
        raise UsageError(f"--accelerator-type={name!r}: unsupported TPU generation {prefix!r}; expected {known}")
    gen = _PREFIXES[prefix]
    if gen in ("v4", "v5p") and (size < 8 or size % 8):
        raise UsageError(
            f"--accelerator-type={name!r}: {prefix} sizes count TensorCores and are multiples of 8 (v4-8, v5p-64, ...)"
        )
    if gen in ("v5e", "v6e") and size not in _V5E_V6E_SIZES:
        raise UsageError(f"--accelerator-type={name!r}: {prefix} slices have {_V5E_V6E_SIZES} chips")
    return Accelerator(name=name, generation=gen, chips=size // _CORES_PER_CHIP[gen])


def check_name(flag: str, value: str) -> str:
    """TPU / queued-resource ids: lowercase letters, digits and hyphens, starting with a letter."""
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", value or ""):
        raise UsageError(
            f"{flag}={value!r}: use lowercase letters, digits and '-', starting with a letter (at most 63)"
        )
    return value


def check_zone(value: str) -> str:
    if not re.fullmatch(r"[a-z]+-[a-z]+\d+-[a-z]", value or ""):
        raise UsageError(f"--zone={value!r} is not a zone name like 'us-east5-a' or 'europe-west4-b'")
    return value


def check_bucket(value: str | None, flag: str = "--bucket") -> str:
    """'gs://bucket' or 'gs://bucket/prefix' (no trailing slash kept)."""
    if not value:
        raise UsageError(f"{flag} is required: a Cloud Storage location such as gs://my-bucket")
    m = re.fullmatch(r"gs://([a-z0-9][a-z0-9._-]{1,61}[a-z0-9])(/[^\s]*)?", value.rstrip("/"))
    if not m:
        raise UsageError(
            f"{flag}={value!r} is not a Cloud Storage location like gs://my-bucket or gs://my-bucket/prefix"
        )
    return value.rstrip("/")


def check_run(value: str) -> str:
    """Run names become folder names on the workers and in the bucket."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value or ""):
        raise UsageError(f"--run={value!r}: use letters, digits, '.', '_' and '-' only")
    return value


def check_remote_dir(value: str) -> str:
    """A folder under $HOME on the workers; plain names only, so it embeds in a shell command as is."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*", value or "") or ".." in value.split("/"):
        raise UsageError(f"--remote-dir={value!r}: give a plain folder path under $HOME on the workers")
    return value


def run_dir(bucket: str, run: str) -> str:
    """A run's output_dir in the bucket; orbax writes checkpoints under <it>/checkpoints/<step>."""
    return f"{bucket}/runs/{run}"


def add_target_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--name, --zone, --project: which TPU the command talks to (checked later when not `required`)."""
    parser.add_argument("--name", required=required, help="TPU VM (node) name")
    parser.add_argument("--zone", required=required, help="e.g. us-east5-a")
    parser.add_argument("--project", default=None, help="Google Cloud project (default: gcloud's configured one)")


def add_dry_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print the commands, one per line, and run nothing")


def location_flags(args) -> list[str]:
    flags = [f"--zone={check_zone(args.zone)}"]
    if args.project:
        flags.append(f"--project={args.project}")
    return flags


def ssh_all(args, remote_command: str, worker: str = "all") -> list[str]:
    """`gcloud compute tpus tpu-vm ssh` running `remote_command` on every worker (or one)."""
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        check_name("--name", args.name),
        *location_flags(args),
        f"--worker={worker}",
        f"--command={remote_command}",
    ]


def run_commands(commands: list[list[str]], dry_run: bool) -> int:
    """Prints (dry run) or runs each command in order, stopping at the first failure."""
    if dry_run:
        for cmd in commands:
            print(shlex.join(cmd))
        return 0
    for cmd in commands:
        if shutil.which(cmd[0]) is None:
            print(f"error: {cmd[0]!r} is not on PATH (install the Google Cloud CLI, or use --dry-run)", file=sys.stderr)
            return 127
        print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        rc = subprocess.run(cmd).returncode
        if rc:
            print(f"error: exit status {rc} from: {shlex.join(cmd)}", file=sys.stderr)
            return rc
    return 0


def main_for(parser: argparse.ArgumentParser, build, argv=None) -> int:
    """Parse, build the command list (UsageError -> a usage error naming the flag), then print or run."""
    args = parser.parse_args(argv)
    try:
        commands = build(args)
    except UsageError as e:
        parser.error(str(e))  # exits with status 2 and the message
    return run_commands(commands, args.dry_run)
