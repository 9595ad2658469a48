"""torchrun entry: sharded attention prefill / training step on synthetic data.

    torchrun --standalone --nproc-per-node 2 ringmem/launch/prefill.py \\
        --config configs/prefill_cpu.toml

gloo on CPU, NCCL when CUDA is available. Prints per-rank step time, tokens/s and peak memory.
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist

import ringmem
from ringmem.config import ArgumentParser, PrefillConfig, load_config
from ringmem.layouts import split_len
from ringmem.timeouts import exit_on_comm_error, init_process_group, resolve


def parse(argv: list[str] | None = None) -> PrefillConfig:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="TOML file (see configs/)")
    p.add_argument("--seq-len", type=int, dest="seq_len")
    p.add_argument("--steps", type=int)
    p.add_argument("--backend")
    p.add_argument("--timeout", type=float, help="seconds to wait for a peer (RINGMEM_TIMEOUT)")
    args = p.parse_args(argv)
    over = {k: v for k, v in vars(args).items() if k != "config"}
    return load_config(PrefillConfig, args.config, **over)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def physical_memory() -> int | None:
    """This machine's RAM in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(cfg: PrefillConfig, memory: int | None = None) -> None:
    """Each rank builds the global q, k and v on the host before sharding them: refuse a
    config whose three tensors alone exceed the machine's memory (a lower bound on what
    the job needs, so no config that could run is refused), instead of a traceback after
    the allocation fails."""
    memory = physical_memory() if memory is None else memory
    width = torch.tensor([], dtype=getattr(torch, cfg.dtype)).element_size()
    need = cfg.batch * cfg.seq_len * (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim * width
    if memory is not None and need > memory:
        raise ValueError(
            f"seq_len={cfg.seq_len} is too long for this machine: each rank builds the "
            f"global q, k, v (batch {cfg.batch} x seq_len {cfg.seq_len} x ({cfg.heads} + "
            f"2 x {cfg.kv_heads}) heads x head_dim {cfg.head_dim} x {width} bytes = "
            f"{_size(need)}) before sharding, more than its {_size(memory)} of memory")


def check(argv: list[str] | None, world: int | None) -> PrefillConfig:
    """The config and everything checkable without a process group (also run by the
    console command before torchrun starts); world None: unknown (elastic)."""
    cfg = parse(argv)
    resolve(cfg.timeout)  # a malformed RINGMEM_TIMEOUT fails here, not in every rank
    check_memory(cfg)
    if world is not None:
        if cfg.world_size is not None and cfg.world_size != world:
            raise ValueError(f"config asks for world_size={cfg.world_size}, torchrun "
                             f"started {world}")
        split_len(cfg.layout, cfg.seq_len, world)
        if cfg.ulysses != "auto" and world % cfg.ulysses:
            raise ValueError(f"ulysses={cfg.ulysses} does not divide the world size {world}")
    return cfg


def main(argv: list[str] | None = None) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = check(argv, world)
    except ValueError as e:
        sys.exit(f"prefill: {e}")
    with exit_on_comm_error("prefill"):
        job(cfg, world)


def job(cfg: PrefillConfig, world: int) -> None:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_process_group("nccl" if cuda else "gloo", timeout=cfg.timeout)
    rank = dist.get_rank()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = getattr(torch, cfg.dtype)
    g = torch.Generator().manual_seed(cfg.seed)
    shape_q = (cfg.batch, cfg.seq_len, cfg.heads, cfg.head_dim)
    shape_kv = (cfg.batch, cfg.seq_len, cfg.kv_heads, cfg.head_dim)
    q, k, v = (ringmem.shard(torch.randn(s, generator=g, dtype=dtype), layout=cfg.layout)
               .to(device).requires_grad_(cfg.backward) for s in (shape_q, shape_kv, shape_kv))
    kwargs = dict(causal=cfg.causal, layout=cfg.layout, schedule=cfg.schedule,
                  ulysses=cfg.ulysses, backend=cfg.backend)
    times = []
    for step in range(cfg.steps + 1):  # step 0 warms up
        dist.barrier()
        t0 = time.perf_counter()
        out = ringmem.ring_attention(q, k, v, **kwargs)
        if cfg.backward:
            out.sum().backward()
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    what = "fwd+bwd" if cfg.backward else "fwd"
    line = (f"[rank {rank}/{world}] {what} {t * 1e3:.1f} ms/step, "
            f"{cfg.batch * cfg.seq_len / t:,.0f} tokens/s (global), "
            f"local tokens {q.shape[1]}, peak memory {peak / 2**20:.0f} MiB, "
            f"finite={bool(torch.isfinite(out).all())}")
    lines = [None] * world
    dist.all_gather_object(lines, line)  # one ordered report instead of interleaved prints
    if rank == 0:
        print(f"prefill: {cfg}", *lines, sep="\n", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
