"""Run a function on N gloo ranks on this machine (tests, examples, CPU benchmarks).

`spawn(fn, world, *args)` starts `world` processes, initialises a gloo process group in each
through a fresh file (no ports to collide under parallel pytest) with a bounded timeout
(`pg_timeout`: argument > RINGMEM_TIMEOUT > min(timeout, 120 s)), calls fn(rank, world,
*args), and raises `SpawnError` listing every rank's outcome if any rank raised or died.
When one rank fails the others get `pg_timeout` + `grace` seconds to raise their own errors
(a peer's death or freeze surfaces there as a clear `CommError`), then are killed. A run
that outlives `timeout` seconds is killed and reported as a `SpawnTimeout` (a hang is a
failure, loudly). No rank process outlives the call.
"""
from __future__ import annotations

import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_any
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .timeouts import ENV, CommError, init_process_group, resolve, short_error


@dataclass
class RankResult:
    """How one rank ended. `ended` is wall-clock time (time.time()) of its return or error
    as seen by the rank, else when spawn saw it exit or killed it."""
    rank: int
    exitcode: int | None  # None: never seen to exit (killed by spawn)
    pid: int = 0
    error_type: str | None = None  # the exception's class name, when fn raised
    error: str | None = None  # its message
    traceback: str | None = None
    started: float = 0.0
    ended: float = 0.0
    killed: bool = False  # spawn killed it (still running after the grace period)

    @property
    def ok(self) -> bool:
        return self.exitcode == 0 and self.error is None

    def summary(self) -> str:
        took = f" after {self.ended - self.started:.1f} s" if self.started else ""
        if self.error_type is not None:
            return f"rank {self.rank}: {self.error_type}: {self.error}{took}"
        if self.killed:
            return f"rank {self.rank}: killed by spawn (still running){took}"
        if self.exitcode == 0:
            return f"rank {self.rank}: ok{took}"
        return f"rank {self.rank}: exited with code {self.exitcode} without a Python error{took}"


class SpawnError(RuntimeError):
    """A rank raised or died; `results` holds every rank's outcome."""

    def __init__(self, message: str, results: list[RankResult]) -> None:
        super().__init__(message)
        self.results = results


class SpawnTimeout(SpawnError, TimeoutError):
    """The whole run outlived spawn's `timeout` (a hang)."""


def _write(result_dir: str, rank: int, data: dict) -> None:
    tmp = os.path.join(result_dir, f".rank{rank}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(data, f)
    os.replace(tmp, os.path.join(result_dir, f"rank{rank}.pkl"))


def _entry(rank: int, fn: Callable[..., Any], world: int, init_file: str, threads: int,
           pg_timeout: float, result_dir: str, args: tuple) -> None:
    started = time.time()
    os.environ[ENV] = repr(pg_timeout)  # ringmem's waits in this rank use the same bound
    torch.set_num_threads(threads)
    try:
        init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                           world_size=world, timeout=pg_timeout)
        fn(rank, world, *args)
        try:  # nobody tears down while a peer may still be finishing its last exchange
            dist.barrier()
        except Exception as e:  # noqa: BLE001
            raise CommError(f"spawn: rank {rank} returned, but a peer never reached the "
                            f"closing barrier ({short_error(e)})",
                            op="spawn (closing barrier)") from e
    except BaseException as e:  # noqa: BLE001 (reported to the parent, then a hard exit)
        _write(result_dir, rank, dict(error_type=type(e).__name__, error=str(e),
                                      traceback=traceback.format_exc(), started=started,
                                      ended=time.time()))
        sys.stderr.flush()
        # no teardown: destroying a group whose peer is dead or frozen can block
        os._exit(1)
    dist.destroy_process_group()
    _write(result_dir, rank, dict(started=started, ended=time.time()))
    # Leave without interpreter finalization: with some libraries loaded (transformers),
    # native static destructors at exit intermittently hit std::terminate (SIGABRT) after
    # the work has finished and been checked.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _collect(procs: list, result_dir: str, seen: dict[int, float],
             killed: set[int]) -> list[RankResult]:
    out = []
    for r, p in enumerate(procs):
        res = RankResult(r, p.exitcode, p.pid, ended=seen.get(r, time.time()),
                         killed=r in killed)
        path = os.path.join(result_dir, f"rank{r}.pkl")
        if os.path.exists(path):
            with open(path, "rb") as f:
                for k, v in pickle.load(f).items():
                    setattr(res, k, v)
        out.append(res)
    return out


def spawn(fn: Callable[..., Any], world: int, *args: Any, threads: int = 1,
          timeout: float = 300.0, pg_timeout: float | None = None,
          grace: float = 5.0) -> list[RankResult]:
    """Run fn(rank, world, *args) on `world` gloo ranks; raise `SpawnError` if any rank
    raised or died, `SpawnTimeout` if the run hung. Returns every rank's result.

    fn must be importable (defined at module level) because ranks start fresh interpreters.
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    pg = resolve(pg_timeout, default=min(timeout, 120.0))
    result_dir = tempfile.mkdtemp(prefix="ringmem-spawn-")
    init_file = os.path.join(result_dir, "pg")  # the file store creates it
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry,
                         args=(r, fn, world, init_file, threads, pg, result_dir, args))
             for r in range(world)]
    seen: dict[int, float] = {}  # rank -> when its exit was seen
    killed: set[int] = set()
    name = getattr(fn, "__name__", fn)
    try:
        for p in procs:
            p.start()
        deadline, stop_at = time.monotonic() + timeout, None
        while len(seen) < world:
            alive = [p for r, p in enumerate(procs) if r not in seen]
            wait_any([p.sentinel for p in alive], timeout=0.2)
            for r, p in enumerate(procs):
                if r not in seen and p.exitcode is not None:
                    seen[r] = time.time()
                    if p.exitcode != 0 and stop_at is None:  # let the others report theirs
                        stop_at = min(deadline, time.monotonic() + pg + grace)
            if time.monotonic() >= (stop_at or deadline):
                break
        hung = len(seen) < world and stop_at is None
    finally:
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()  # SIGKILL: also ends a SIGSTOPped rank
                killed.add(r)
        for r, p in enumerate(procs):  # reap them: no zombie outlives the call
            if p.pid is None:  # never started (start raised): nothing to reap
                continue
            p.join(10)
            seen.setdefault(r, time.time())
    results = _collect(procs, result_dir, seen, killed)
    shutil.rmtree(result_dir, ignore_errors=True)
    if all(r.ok for r in results):
        return results
    lines = "\n".join("  " + r.summary() for r in results)
    if hung:
        raise SpawnTimeout(f"{name} on {world} ranks did not finish within {timeout:.0f} s "
                           f"(hang?):\n{lines}", results)
    failed = sorted((r for r in results if not r.ok),
                    key=lambda r: (r.error_type is None, r.ended))
    first = failed[0]
    detail = (f"\n--- rank {first.rank}, the first to fail ---\n{first.traceback}"
              if first.traceback else "")
    raise SpawnError(f"{name} on {world} ranks failed:\n{lines}{detail}", results)
