"""Run a function on N gloo ranks on this machine (tests, examples, CPU benchmarks).

`spawn(fn, world, *args)` starts `world` processes, initialises a gloo process group in each
through a fresh file (no ports to collide under parallel pytest), calls fn(rank, world,
*args), and re-raises the first rank's exception in the caller. A run that outlives
`timeout` seconds is killed and reported as a TimeoutError (a hang is a failure, loudly).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., Any], world: int, init_file: str, threads: int,
           args: tuple) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        fn(rank, world, *args)
        # nobody tears down while a peer may still be finishing its last exchange
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalization: with some libraries loaded (transformers),
    # native static destructors at exit intermittently hit std::terminate (SIGABRT) after
    # the work has finished and been checked. Errors still propagate: this line is only
    # reached when fn returned.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable[..., Any], world: int, *args: Any, threads: int = 1,
          timeout: float = 300.0) -> None:
    """Run fn(rank, world, *args) on `world` gloo ranks; raise if any rank raised or hung.

    fn must be importable (defined at module level) because ranks start fresh interpreters.
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    fd, init_file = tempfile.mkstemp(prefix="ringmem-pg-")
    os.close(fd)
    os.unlink(init_file)  # the file store creates it; a stale file would confuse it
    try:
        ctx = mp.start_processes(_entry, args=(fn, world, init_file, threads, args),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:  # reap them: no zombie outlives the test
                    p.join(10)
                raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world} ranks did not "
                                   f"finish within {timeout:.0f} s (hang?)")
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)
