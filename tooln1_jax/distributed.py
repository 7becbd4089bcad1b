"""Multi-host runs: one JAX process per host, every process running the same program.

A TPU pod slice (or a GPU cluster) runs one process per host; each process holds only its own
devices' shards of every global array. This module is the one place that knows it:

- `initialize` starts the runtime (before any other JAX call) with a heartbeat timeout, so a
  process whose peer died (killed, out of memory) aborts with JAX's message naming the lost
  process instead of waiting in a collective forever;
- `to_host` brings a global array to numpy on every process (an all-gather when it spans other
  processes' devices), for rollout tokens, log-probs and HF export;
- `all_or_none` runs a setup stage on every process and, if it failed on any of them, raises on
  all of them with the failing process's error, instead of leaving the others in a collective;
- `is_main` names the one process that writes logs, summaries, plots and HF folders.

With one process every function is a plain local operation.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

T = TypeVar("T")

# Bytes of an error message that `all_or_none` sends to the other processes.
_MESSAGE_BYTES = 2048


class PeerFailedError(RuntimeError):
    """Another process failed a stage that every process must pass; the message is its error."""


def initialize(
    *,
    enabled: bool,
    coordinator_address: str = "",
    num_processes: int = -1,
    process_id: int = -1,
    heartbeat_timeout_s: int = 100,
) -> bool:
    """`jax.distributed.initialize` once, when `enabled`. Empty / -1 arguments are auto-detected
    by JAX (TPU pods, SLURM, MPI). A peer silent for `heartbeat_timeout_s` seconds stops every
    process with a non-zero exit. Must run before anything touches the XLA backend. Returns
    whether the distributed runtime is up."""
    if not enabled:
        return False
    if not jax.distributed.is_initialized():
        given = dict(
            coordinator_address=coordinator_address or None,
            num_processes=None if num_processes < 0 else num_processes,
            process_id=None if process_id < 0 else process_id,
        )
        jax.distributed.initialize(
            **{k: v for k, v in given.items() if v is not None}, heartbeat_timeout_seconds=int(heartbeat_timeout_s)
        )
    return True


def initialize_from_config(dist) -> bool:
    """`initialize` with a run config's `distributed` section."""
    return initialize(
        enabled=bool(dist.enabled),
        coordinator_address=str(dist.coordinator_address),
        num_processes=int(dist.num_processes),
        process_id=int(dist.process_id),
        heartbeat_timeout_s=int(dist.heartbeat_timeout_s),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The argparse flags of `initialize`, for the CLIs that are not config-driven (evaluate, export)."""
    g = parser.add_argument_group("multi-host (one process per host; see the README's Multi-host section)")
    g.add_argument("--distributed", action="store_true", help="start jax.distributed (auto-detected on TPU pods)")
    g.add_argument("--coordinator-address", default="", help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=-1)
    g.add_argument("--process-id", type=int, default=-1)
    g.add_argument("--heartbeat-timeout-s", type=int, default=100, help="seconds before a silent peer stops the run")


def initialize_from_args(args: argparse.Namespace) -> bool:
    return initialize(
        enabled=args.distributed,
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
        heartbeat_timeout_s=args.heartbeat_timeout_s,
    )


def is_main() -> bool:
    """Process 0: the one that writes metrics, summaries, plots and exported folders."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """Every array leaf -> numpy holding the whole global array, on every process. An array that
    spans other processes' devices is all-gathered (every process must call this together)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def gather_ints(value: int) -> list[int]:
    """Every process's `value`, in process order (every process must call this together)."""
    if jax.process_count() == 1:
        return [int(value)]
    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int64(value))).reshape(-1)]


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (every process must call this together)."""
    return any(gather_ints(int(bool(flag))))


def _encode(message: str) -> np.ndarray:
    raw = message.encode("utf-8")[:_MESSAGE_BYTES]
    out = np.zeros(_MESSAGE_BYTES + 1, np.uint8)  # last byte: 1 = failed
    out[: len(raw)] = np.frombuffer(raw, np.uint8)
    out[-1] = 1 if message else 0
    return out


def all_or_none(stage: str, fn: Callable[[], T]) -> T:
    """Runs `fn()` on every process, then lets each process see whether any of them failed.
    The failing process re-raises its own error; the others raise `PeerFailedError` with it,
    so no process waits in a later collective for a peer that has already given up.
    Call it where every process runs the same stages in the same order."""
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - reported to every process below, then re-raised
        error = e
    if jax.process_count() > 1:
        message = "" if error is None else f"{type(error).__name__}: {error}"
        everyone = np.asarray(multihost_utils.process_allgather(_encode(message))).reshape(jax.process_count(), -1)
        if error is None:
            for pid, row in enumerate(everyone):
                if row[-1]:
                    text = bytes(row[:-1]).rstrip(b"\0").decode("utf-8", "replace")
                    raise PeerFailedError(f"process {pid} failed during {stage}: {text}")
    if error is not None:
        raise error
    return result


def check_writable(folder: str, what: str) -> None:
    """Proves a file can be written in `folder`, or (when it does not exist yet) in its nearest
    existing parent, without creating anything: a run fails in seconds rather than after its
    warm start. URLs (gs://) are left to orbax."""
    if "://" in folder:
        return
    target = os.path.abspath(folder)
    while not os.path.exists(target):
        target = os.path.dirname(target)
    if not os.path.isdir(target):
        where = "is a file" if target == os.path.abspath(folder) else f"is inside a file ({target})"
        raise NotADirectoryError(f"{what}={folder!r} {where}, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".write_test_"):
            pass
    except OSError as e:
        raise PermissionError(f"{what}={folder!r} cannot be written ({target}: {e.strerror or e})") from None
