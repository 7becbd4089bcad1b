"""Install the package on every worker of a slice: Python 3.11 venv, the code, `pip install -e ".[tpu]"`.

    python tpu_scripts/install.py --name tooln1-7b --zone us-east5-a \\
        --repo-url https://github.com/ORG/tooln1-jax --dry-run
    python tpu_scripts/install.py --name tooln1-7b --zone us-east5-a --from-local . --dry-run

The code comes from a git clone (--repo-url, --ref) or from this checkout's committed HEAD
(--from-local: `git archive` here, copied to every worker with `tpu-vm scp --worker=all`).
TPU images are Ubuntu 22.04 with Python 3.10, and the package needs 3.11, so python3.11 is
installed with apt first (--skip-apt when the image already has it). The last step prints each
worker's JAX process index and the slice's device count: every worker must report the same count.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

from common import (
    DEFAULT_REMOTE_DIR,
    DEFAULT_VENV,
    UsageError,
    add_dry_run,
    add_target_args,
    check_name,
    check_remote_dir,
    location_flags,
    main_for,
    ssh_all,
)

ARCHIVE = "tooln1-jax-src.tar.gz"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--repo-url", help="git URL every worker clones")
    src.add_argument("--from-local", metavar="CHECKOUT", help="ship this git checkout's committed HEAD instead")
    p.add_argument("--ref", default="main", help="branch or tag to clone (with --repo-url)")
    p.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR, help="checkout folder on each worker, under $HOME")
    p.add_argument("--python", default="python3.11", help="interpreter that creates the venv on the workers")
    p.add_argument("--skip-apt", action="store_true", help="do not apt-get install git and python3.11")
    p.add_argument(
        "--local-archive", default=os.path.join("/tmp", ARCHIVE), help="where --from-local writes the archive"
    )
    add_dry_run(p)
    return p


def build_commands(args) -> list[list[str]]:
    check_name("--name", args.name)
    remote = f"$HOME/{check_remote_dir(args.remote_dir)}"
    venv = f"$HOME/{DEFAULT_VENV}"
    steps = []
    if not args.skip_apt:
        if not re.fullmatch(r"python3\.\d+", args.python):
            raise UsageError(
                f"--python={args.python!r}: apt installs only 'python3.N' names; add --skip-apt for another interpreter"
            )
        steps.append("sudo apt-get update -q")
        steps.append(f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q git {args.python} {args.python}-venv")
    commands = []
    if args.from_local:
        if not os.path.exists(os.path.join(args.from_local, ".git")):
            raise UsageError(f"--from-local={args.from_local!r} is not a git checkout (no .git folder)")
        commands.append(
            ["git", "-C", args.from_local, "archive", "--format=tar.gz", f"--output={args.local_archive}", "HEAD"]
        )
        commands.append(
            [
                "gcloud",
                "compute",
                "tpus",
                "tpu-vm",
                "scp",
                args.local_archive,
                f"{args.name}:{ARCHIVE}",
                *location_flags(args),
                "--worker=all",
            ]
        )
        steps.append(f'rm -rf "{remote}" && mkdir -p "{remote}" && tar -xzf "$HOME/{ARCHIVE}" -C "{remote}"')
    else:
        url, ref = shlex.quote(args.repo_url), shlex.quote(args.ref)
        steps.append(
            f'if [ -d "{remote}/.git" ]; then git -C "{remote}" fetch --depth 1 origin {ref} && '
            f'git -C "{remote}" checkout --force FETCH_HEAD; '
            f'else git clone --depth 1 --branch {ref} {url} "{remote}"; fi'
        )
    steps.append(f'{shlex.quote(args.python)} -m venv "{venv}"')
    steps.append(f'"{venv}/bin/python" -m pip install -q -U pip')
    steps.append(f'cd "{remote}" && "{venv}/bin/python" -m pip install -q -e ".[tpu]"')
    steps.append(f'"{venv}/bin/python" -c "import jax; print(jax.process_index(), jax.device_count())"')
    commands.append(ssh_all(args, " && ".join(steps)))
    return commands


if __name__ == "__main__":
    sys.exit(main_for(build_parser(), build_commands))
