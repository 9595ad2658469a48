"""The `ringmem` console command: torchrun for the common cases.

    ringmem infer [--nproc N] [infer options]     long-document inference (default: the demo)
    ringmem prefill [--nproc N] --config F        sharded attention prefill / training step
    ringmem train [--nproc N] --config F          context-parallel training (FSDP2 x CP)
    ringmem train --engine megatron --config F    megatron-core GPTModel, ringmem as its CP

`--nproc` defaults to the number of GPUs, or 2 on a CPU machine. torchrun's multi-node
flags (--nnodes, --node-rank, --rdzv-endpoint, --rdzv-backend, --rdzv-id, --max-restarts)
are passed to torchrun (then its own rendezvous replaces --standalone). Everything else
goes to the launcher (`ringmem train --help` lists its options).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

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


def command(job: str, nproc: int, rest: list[str]) -> list[str]:
    """The torchrun command line that `ringmem <job>` runs."""
    if job not in JOBS:
        raise ValueError(f"job must be one of {sorted(JOBS)}, got {job!r}")
    if rest[:1] in (["-h"], ["--help"]):
        nproc = 1  # help needs no ranks
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    flags, rest = _split_torchrun(rest)
    module = JOBS[job]
    if job == "train" and "--engine" in rest:  # `--engine megatron`: the other launcher
        i = rest.index("--engine")
        engine = rest[i + 1] if i + 1 < len(rest) else ""
        if engine not in ENGINES:
            raise ValueError(f"--engine must be one of {sorted(ENGINES)}, got {engine!r}")
        module, rest = ENGINES[engine], rest[:i] + rest[i + 2:]
    multi = any(f.startswith(("--nnodes", "--rdzv")) for f in flags)
    return [sys.executable, "-m", "torch.distributed.run",
            *([] if multi else ["--standalone"]), *flags,
            f"--nproc-per-node={nproc}", "-m", module, *rest]


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
    args, rest = p.parse_known_args(argv)
    try:
        cmd = command(args.job, args.nproc if args.nproc is not None else default_nproc(), rest)
    except ValueError as e:
        p.error(str(e))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its warning
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
