"""Stream a run's log from one worker (default 0, the process that prints metrics) or all of them.

python tpu_scripts/logs.py --name tooln1-7b --zone us-east5-a --run tool_n1_qwen2_5_7b --dry-run
"""

from __future__ import annotations

import argparse
import sys

from common import LOG_ROOT, UsageError, add_dry_run, add_target_args, check_run, main_for, ssh_all


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_args(p)
    p.add_argument("--run", required=True, help="run name given to launch.py (default there: the config's file name)")
    p.add_argument("--worker", default="0", help="worker index, or 'all'")
    p.add_argument("--lines", type=int, default=100, help="lines of history to show first")
    p.add_argument("--no-follow", action="store_true", help="print the last lines and exit instead of following")
    add_dry_run(p)
    return p


def build_commands(args) -> list[list[str]]:
    if not (args.worker == "all" or args.worker.isdigit()):
        raise UsageError(f"--worker={args.worker!r}: a worker index (0, 1, ...) or 'all'")
    if args.lines < 0:
        raise UsageError(f"--lines={args.lines}: must be >= 0")
    follow = "" if args.no_follow else " -F"
    remote = f'tail -n {args.lines}{follow} "{LOG_ROOT}/{check_run(args.run)}/"*.log'
    return [ssh_all(args, remote, worker=args.worker)]


if __name__ == "__main__":
    sys.exit(main_for(build_parser(), build_commands))
