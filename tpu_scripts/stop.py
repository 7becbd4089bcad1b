"""Stop a launched run on every worker: sends SIGTERM to the process id launch.py saved.

    python tpu_scripts/stop.py --name tooln1-7b --zone us-east5-a --run tool_n1_qwen2_5_7b --dry-run

Needed before relaunching on the same slice: a running process holds the TPU chips.
"""

from __future__ import annotations

import argparse
import sys

from common import LOG_ROOT, add_dry_run, add_target_args, check_run, main_for, ssh_all


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_args(p)
    p.add_argument("--run", required=True, help="run name given to launch.py")
    add_dry_run(p)
    return p


def build_commands(args) -> list[list[str]]:
    pid_file = f'"{LOG_ROOT}/{check_run(args.run)}/$(hostname).pid"'
    # A worker without a pid file, or whose process already ended, reports it and succeeds.
    remote = (
        f'if [ -f {pid_file} ] && kill $(cat {pid_file}) 2>/dev/null; then echo "$(hostname): stopped"; '
        f'else echo "$(hostname): not running"; fi'
    )
    return [ssh_all(args, remote)]


if __name__ == "__main__":
    sys.exit(main_for(build_parser(), build_commands))
