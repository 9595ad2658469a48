"""Time bounds on every cross-rank wait: one place resolves the timeout, one place turns a
failed wait into an error that names the operation, the phase, the step and the peer.

The timeout is, in order: an explicit argument (launcher config `timeout`, `spawn(...,
pg_timeout=)`), the RINGMEM_TIMEOUT environment variable (seconds), a default (300 s for
launchers). `init_process_group` gives it to torch (so gloo and NCCL ops, barriers and
collectives honour it) and records it, so ringmem's own waits (ring transfers, the control
group's checks) use the same bound. Without it, gloo's default would be 30 minutes.
"""
from __future__ import annotations

import os
import re
import sys
import time
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch.distributed as dist

ENV = "RINGMEM_TIMEOUT"
DEFAULT = 300.0  # seconds: long enough for a skewed model load, short enough to notice
_group_timeout: float | None = None  # what `init_process_group` set in this process


class CommError(RuntimeError):
    """A cross-rank wait failed: the peer died, closed its connection or errored."""

    def __init__(self, message: str, *, op: str, phase: str | None = None,
                 step: int | None = None, peers: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.op, self.phase, self.step, self.peers = op, phase, step, tuple(peers)
        exit_on_uncaught_comm_error()  # whatever init the script used, it must not hang


class CommTimeoutError(CommError, TimeoutError):
    """A cross-rank wait outlived the timeout: the peer is frozen, gone or elsewhere."""


def _from_comm(e: BaseException | None) -> bool:
    """Whether `e` or an exception it was raised from / during is a CommError."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, CommError):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def exit_on_uncaught_comm_error() -> None:
    """Install (once) a sys.excepthook that, for an uncaught CommError, prints the traceback
    as usual and then ends the process with `os._exit(1)`.

    Why: the failed wait leaves a gloo send/recv posted to the frozen peer, and the process
    group's teardown (destroy, abort, or the interpreter's own exit) waits for it for the
    group's timeout: 30 minutes under a plain `dist.init_process_group`. Skipping teardown
    is safe here: the process is ending with an error, and torchrun stops its peers.
    """
    if getattr(sys.excepthook, "_ringmem", False):
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException,
             tb: types.TracebackType | None) -> None:
        previous(kind, value, tb)
        if _from_comm(value):
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError, AttributeError):
                    pass
            os._exit(1)

    hook._ringmem = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def resolve(timeout: float | timedelta | None = None, default: float = DEFAULT) -> float:
    """Seconds: `timeout` if given, else RINGMEM_TIMEOUT, else `default`; must be > 0."""
    source = "timeout"
    if timeout is None:
        env = os.environ.get(ENV, "").strip()
        if env:
            source, timeout = ENV, env
    if timeout is None:
        timeout = default
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    try:
        value = float(timeout)
    except (TypeError, ValueError):
        raise ValueError(f"{source} must be a number of seconds, got {timeout!r}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{source} must be a positive finite number of seconds, got {timeout!r}")
    return value


def current() -> float:
    """The bound on ringmem's waits in this process: the process group's (when ringmem set
    it up), else RINGMEM_TIMEOUT, else the default."""
    return _group_timeout if _group_timeout is not None else resolve()


def init_process_group(backend: str | None = None, *, timeout: float | timedelta | None = None,
                       **kwargs: Any) -> float:
    """`torch.distributed.init_process_group` with the resolved timeout; returns it (s)."""
    global _group_timeout
    seconds = resolve(timeout)
    dist.init_process_group(backend, timeout=timedelta(seconds=seconds), **kwargs)
    _group_timeout = seconds
    return seconds


def group_timeout() -> timedelta:
    """For groups ringmem creates itself (torch would give them gloo's 30 minutes)."""
    return timedelta(seconds=current())


_TIMED_OUT = ("timed out", "timeout")
_LOST = ("connection closed", "connection reset", "broken pipe", "connection refused",
         "socket closed", "end of file", "no route")


def short_error(e: BaseException) -> str:
    """The first line of a torch/gloo error without its source-path prefix."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", msg)[:400]


def comm_error(e: BaseException, *, op: str, what: str, peers: Sequence[int], rank: int,
               elapsed: float, limit: float | None, phase: str | None = None,
               step: int | None = None) -> CommError:
    """The ringmem error for a failed wait: names where (op, phase, step), who and why."""
    where = op + (f" ({phase}" + (f", step {step})" if step is not None else ")")
                  if phase else "")
    who = (f"rank {peers[0]}" if len(peers) == 1 else f"ranks {list(peers)}")
    low = str(e).lower()
    kw = dict(op=op, phase=phase, step=step, peers=peers)
    if any(s in low for s in _TIMED_OUT):
        bound = f"{limit:g} s" if limit is not None else "the process group's timeout"
        return CommTimeoutError(
            f"{where}: rank {rank} waited {elapsed:.1f} s for {who} ({what}) and gave up at "
            f"the {bound} timeout ({ENV}): the peer is frozen, gone, or in another operation",
            **kw)
    if any(s in low for s in _LOST):
        return CommError(f"{where}: rank {rank} lost {who} ({what}) after {elapsed:.1f} s: "
                         f"its connection closed, so it died or exited "
                         f"({short_error(e).split('. ')[0]})", **kw)
    return CommError(f"{where}: rank {rank}: {what} with {who} failed after {elapsed:.1f} s: "
                     f"{short_error(e)}", **kw)


def wait_works(works: Sequence[dist.Work], labels: Sequence[tuple[str, int]], *, op: str,
               rank: int, timed: bool, phase: str | None = None,
               step: int | None = None) -> None:
    """Wait on `works` (one (what, peer) label per work, or labels for all of them).

    timed: bound the host wait (gloo: CPU tensors). NCCL works are not waited on the host
    (that would synchronise with the GPU); the process group's timeout bounds them.
    """
    limit = current() if timed else None
    t0 = time.monotonic()
    for i, w in enumerate(works):
        label = [labels[i]] if len(labels) == len(works) else list(labels)
        try:
            if limit is not None:
                w.wait(timedelta(seconds=max(0.001, limit - (time.monotonic() - t0))))
            else:
                w.wait()
        except Exception as e:  # noqa: BLE001 (torch raises RuntimeError subclasses)
            raise comm_error(e, op=op, what=" and ".join(sorted({x for x, _ in label})),
                             peers=sorted({p for _, p in label}), rank=rank,
                             elapsed=time.monotonic() - t0, limit=limit, phase=phase,
                             step=step) from e


@contextmanager
def exit_on_comm_error(name: str) -> Iterator[None]:
    """Launchers: a failed cross-rank wait ends this rank with one line and exit code 1."""
    try:
        yield
    except RuntimeError as e:
        low = str(e).lower()
        if not (isinstance(e, (CommError, dist.DistError))
                or any(s in low for s in _TIMED_OUT + _LOST)):
            raise
        who = "" if isinstance(e, CommError) else (  # ringmem's messages name the rank
            f"rank {dist.get_rank()}: " if dist.is_initialized() else "")
        print(f"{name}: {who}{short_error(e)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # no teardown: destroying a group whose peer is dead or frozen can block
