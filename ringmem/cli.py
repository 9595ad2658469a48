"""The `ringmem` console command: torchrun for the common cases.

    ringmem infer [--nproc N] [infer options]     long-document inference (default: the demo)
    ringmem prefill [--nproc N] --config F        sharded attention prefill / training step
    ringmem train [--nproc N] --config F          context-parallel training (FSDP2 x CP)
    ringmem train --engine megatron --config F    megatron-core GPTModel, ringmem as its CP
    ringmem bench ring|decode|schedules|calibrate|validate|sim [...]
                                                  benchmarks and simulator sweeps
                                                  (`ringmem bench --help`)
    ringmem cache list|remove KEY|--all [--dir D]
                                                  saved document caches (no torchrun)
    ringmem eval --out DIR [--model M --tasks ... --tokens N --policies ... --keep ...]
                                                  RULER-style accuracy vs compression
                                                  (runs `ringmem infer --jobs`)

`--nproc` defaults to the number of GPUs, or 2 on a CPU machine. torchrun's multi-node
flags (--nnodes, --node-rank, --rdzv-endpoint, --rdzv-backend, --rdzv-id, --max-restarts)
are passed to torchrun (then its own rendezvous replaces --standalone). Everything else
goes to the launcher (`ringmem train --help` lists its options).

The launcher's arguments and config are checked here, before torchrun starts: an error is
one line and a non-zero exit. SIGTERM, SIGINT and SIGHUP are forwarded to torchrun, which
stops its workers; the command waits for them, and kills any worker still left after
torchrun exits (a second signal kills the whole tree at once). Waits between ranks are
bounded by the config's `timeout`, else RINGMEM_TIMEOUT, else 300 s.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import signal
import subprocess
import sys
import time

JOBS = {"infer": "ringmem.launch.infer", "prefill": "ringmem.launch.prefill",
        "train": "ringmem.launch.train"}
ENGINES = {"hf": "ringmem.launch.train", "megatron": "ringmem.launch.train_megatron"}
TORCHRUN_FLAGS = ("--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-backend", "--rdzv-id",
                  "--max-restarts")


def default_nproc() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _split_torchrun(rest: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's own flags, the launcher's arguments) out of `rest`."""
    mine: list[str] = []
    other: list[str] = []
    it = iter(rest)
    for arg in it:
        name = arg.split("=", 1)[0]
        if name in TORCHRUN_FLAGS:
            mine.append(arg if "=" in arg else f"{arg}={next(it, '')}")
        else:
            other.append(arg)
    return mine, other


def _resolve(job: str, rest: list[str]) -> tuple[str, list[str], list[str]]:
    """(launcher module, its arguments, torchrun's flags) for `ringmem <job> rest`."""
    if job not in JOBS:
        raise ValueError(f"job must be one of {sorted(JOBS)}, got {job!r}")
    flags, rest = _split_torchrun(rest)
    module = JOBS[job]
    if job == "train" and "--engine" in rest:  # `--engine megatron`: the other launcher
        i = rest.index("--engine")
        engine = rest[i + 1] if i + 1 < len(rest) else ""
        if engine not in ENGINES:
            raise ValueError(f"--engine must be one of {sorted(ENGINES)}, got {engine!r}")
        module, rest = ENGINES[engine], rest[:i] + rest[i + 2:]
    return module, rest, flags


def _wants_help(rest: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in rest)


def command(job: str, nproc: int, rest: list[str]) -> list[str]:
    """The torchrun command line that `ringmem <job>` runs (through `ringmem.torchrun`,
    torchrun with one-line failure reports)."""
    module, rest, flags = _resolve(job, rest)
    if rest[:1] in (["-h"], ["--help"]):
        nproc = 1  # help needs no ranks
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    multi = any(f.startswith(("--nnodes", "--rdzv")) for f in flags)
    return [sys.executable, "-m", "ringmem.torchrun",
            *([] if multi else ["--standalone"]), *flags,
            f"--nproc-per-node={nproc}", "-m", module, *rest]


def world_size(nproc: int, flags: list[str]) -> int | None:
    """Ranks torchrun will start, or None when elastic (a --nnodes range)."""
    nodes = next((f.split("=", 1)[1] for f in flags if f.startswith("--nnodes")), "1")
    lo, _, hi = nodes.partition(":")
    if not lo.isdigit() or (hi and hi != lo):
        return None
    return nproc * int(lo)


def validate(job: str, nproc: int, rest: list[str]) -> None:
    """Run the launcher's own checks (config, options, world size, files) here, in the
    console process, before torchrun starts; ValueError on the first problem."""
    module, args, flags = _resolve(job, rest)
    importlib.import_module(module).check(args, world_size(nproc, flags))


def _ppids() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc; empty elsewhere)."""
    out = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
                out[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # it exited meanwhile
    return out


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children first)."""
    ppids, found, todo = _ppids(), [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in ppids.items() if pp == p]
        found += kids
        todo += kids
    return found


def _kill_all(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _subreaper() -> None:
    """Orphaned workers (torchrun killed) become our children, so we can end them."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def run(cmd: list[str], env: dict[str, str]) -> int:
    """Run torchrun in its own session, forward SIGTERM/SIGINT/SIGHUP to it, wait, and
    leave no worker behind. Returns its exit status (128 + signal when signalled)."""
    _subreaper()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    got: list[int] = []

    def forward(signum: int, frame: object) -> None:
        got.append(signum)
        if len(got) > 1:  # a second signal: no more patience
            _kill_all([proc.pid, *descendants(proc.pid)])
            return
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    old = {s: signal.signal(s, forward) for s in sigs}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _reap(proc.pid)
    return 128 - rc if rc < 0 else rc  # killed by a signal: the shell's convention


def _reap(pid: int) -> None:
    """Kill and reap whatever torchrun left: its orphans are now our children."""
    left = [p for p in descendants(os.getpid()) if p != pid]
    _kill_all(left)
    deadline = time.monotonic() + 5
    while left and time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if done == 0:
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    # no -h of its own: `ringmem infer --help` must reach the launcher and list its options
    p = argparse.ArgumentParser(prog="ringmem", description=__doc__.splitlines()[0],
                                add_help=False)
    p.add_argument("job", choices=sorted(JOBS))
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: GPUs, or 2 on CPU)")
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] == "bench":  # no torchrun of its own: each benchmark starts what it needs
        from .sim.bench import main as bench
        return bench(argv[1:])
    if argv[0] == "cache":  # bookkeeping of saved document caches, in this process
        from .jobs.cache_cli import main as cache
        return cache(argv[1:])
    if argv[0] == "eval":  # builds a jobs file, then runs `ringmem infer --jobs` on it
        from .evals.run import main as evaluate
        try:
            evaluate(argv[1:])
        except ValueError as e:
            print(f"ringmem eval: error: {e}", file=sys.stderr)
            return 2
        return 0
    args, rest = p.parse_known_args(argv)
    nproc = args.nproc if args.nproc is not None else default_nproc()
    try:
        cmd = command(args.job, nproc, rest)
    except ValueError as e:
        print(f"ringmem: error: {e}", file=sys.stderr)
        return 2
    if not _wants_help(rest):
        try:
            validate(args.job, nproc, rest)
        except ValueError as e:  # the launcher's own message, once, before any rank exists
            name = _resolve(args.job, rest)[0].rsplit(".", 1)[1]
            print(f"{name}: {e}", file=sys.stderr)
            return 1
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its warning
    return run(cmd, env)


if __name__ == "__main__":
    sys.exit(main())
