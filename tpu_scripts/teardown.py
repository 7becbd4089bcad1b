"""Delete the slice (or its queued resource, which deletes its nodes with --force).

python tpu_scripts/teardown.py --name tooln1-7b --zone us-east5-a --queued --dry-run
"""

from __future__ import annotations

import argparse
import sys

from common import add_dry_run, add_target_args, check_name, location_flags, main_for


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_args(p)
    p.add_argument("--queued", action="store_true", help="the slice came from a queued resource (create.py --queued)")
    add_dry_run(p)
    return p


def build_commands(args) -> list[list[str]]:
    name = check_name("--name", args.name)
    if args.queued:
        return [
            [
                "gcloud",
                "compute",
                "tpus",
                "queued-resources",
                "delete",
                name,
                *location_flags(args),
                "--force",
                "--quiet",
            ]
        ]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", name, *location_flags(args), "--quiet"]]


if __name__ == "__main__":
    sys.exit(main_for(build_parser(), build_commands))
