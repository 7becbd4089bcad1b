"""The command line of the config-driven programs (`tooln1_jax.train`, `tooln1_jax.sft`).

    python -m tooln1_jax.train [--config configs/x.py] [--config.a.b=value ...] [--verbose]

`--config` names a config file (default `configs/tiny_cpu.py`); `--config.a.b=value` overrides
one field. A user's mistake (a bad field or value, a missing file, an unwritable folder, a failed
peer) prints one line naming it and exits with status 2; `--verbose` (or TOOLN1_VERBOSE=1) shows
the traceback too. An interrupted run (SIGINT, SIGTERM) exits with 128 + the signal's number.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

from tooln1_jax.checkpoint import CheckpointReadError
from tooln1_jax.config import ConfigError
from tooln1_jax.data.sources import DataFileError
from tooln1_jax.distributed import PeerFailedError
from tooln1_jax.interrupt import RunInterrupted

VERBOSE_ENV = "TOOLN1_VERBOSE"
HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull")
# Exceptions that describe the user's input or environment; anything else is a bug (traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    flags.Error,
    OSError,
    PeerFailedError,
    CheckpointReadError,
    DataFileError,
)


def default_config_path() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_cpu.py")


def define_config_flag(flag_values=None, sys_argv: Sequence[str] | None = None):
    """The `--config` flag (a config file) with `--config.a.b=value` overrides, on `flag_values`
    (default: absl's global FLAGS). Returns its holder; `.value` is the overridden ConfigDict."""
    return config_flags.DEFINE_config_file(
        "config",
        default_config_path(),
        "Run config file (configs/*.py).",
        flag_values=flags.FLAGS if flag_values is None else flag_values,
        sys_argv=None if sys_argv is None else list(sys_argv),
    )


def _unknown_override(argv: Sequence[str]) -> str | None:
    """The first `--config.a.b=...` argument whose field the config file does not have."""
    base = parse_config_args([a for a in argv if not a.startswith("--config.")])
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node = base
        for part in arg[len("--") :].split("=", 1)[0].split(".")[1:]:
            if not hasattr(node, "keys") or part not in node:
                return arg.split("=", 1)[0][2:]
            node = node[part]
    return None


def parse_config_args(argv: Sequence[str]):
    """argv (program name first) -> the run config, exactly as the CLI reads it (not validated).
    An override naming no field raises ConfigError with its path."""
    for i, arg in enumerate(argv):
        path = (
            arg.split("=", 1)[1]
            if arg.startswith("--config=")
            else argv[i + 1]
            if arg == "--config" and i + 1 < len(argv)
            else None
        )
        if path is not None and not os.path.isfile(path.split(":", 1)[0]):
            raise ConfigError(f"--config {path}: no such config file")
    flag_values = flags.FlagValues()
    try:
        holder = define_config_flag(flag_values, argv)  # the overrides are read from argv at definition
        flag_values(list(argv))
        return holder.value
    except (AttributeError, KeyError):
        unknown = _unknown_override(argv)
        if unknown is None:
            raise
        raise ConfigError(f"{unknown} is not a config field (see tooln1_jax/config.py default_config)") from None


def run(program: Callable[[Any], Any], argv: Sequence[str] | None, doc: str) -> None:
    """Parses argv into a config and calls `program(config)`; exits as the module docstring says."""
    argv = list(sys.argv if argv is None else argv)
    verbose = "--verbose" in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--verbose"]
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(doc.strip())
        print(
            f"\nflags:\n  --config FILE        a config file (default {os.path.relpath(default_config_path())})\n"
            "  --config.a.b=VALUE   override one field (all fields: tooln1_jax/config.py)\n"
            f"  --verbose            tracebacks for errors (or {VERBOSE_ENV}=1)"
        )
        sys.exit(0)
    try:
        program(parse_config_args(argv))
    except RunInterrupted as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # the second Ctrl-C
        print("stopped at once (second Ctrl-C): nothing saved since the last checkpoint", file=sys.stderr, flush=True)
        sys.exit(130)
    except USER_ERRORS as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)


def _one_line(error: BaseException) -> str:
    """An error as one line: its first line, and its last when that says more (the OS error)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
