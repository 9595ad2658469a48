"""NCCL smoke test at world size 1 (run by gpu_check.sh under torchrun --nproc-per-node 1):
the ring's point-to-point send-to-self, the return group, the CPU control group of an NCCL
group (cross-rank checks), ring attention with both schedules, and a cache decode step."""
from __future__ import annotations

import torch
import torch.distributed as dist

import ringmem
from ringmem.cache import CacheConfig, ShardedKVCache
from ringmem.comm import RingComm, control_group
from ringmem.reference import reference_attention


def main() -> None:
    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    dev = torch.device("cuda")
    comm = RingComm(None, "fwd", None, dev)
    x = torch.arange(1000, dtype=torch.float32, device=dev)
    y = torch.empty_like(x)
    comm.wait(comm.move(0, [x], [y]))  # to rank - 1 = itself
    assert torch.equal(x, y), "send-to-self"
    comm.prepare_returns()  # the second group over every rank (a collective)
    z = torch.empty_like(x)
    comm.wait(comm.ret(0, [x * 2], 0, [z], 0))
    assert torch.equal(z, x * 2), "return group"
    cg = control_group(None)
    assert dist.get_backend(cg) == "gloo", dist.get_backend(cg)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4096, h, 128, generator=g) for h in (32, 8, 8))
    ref, _ = reference_attention(*(t.double() for t in (q, k, v)), causal=True)
    for schedule in ("kv", "q"):
        out = ringmem.ring_attention(*(t.to(dev, torch.bfloat16) for t in (q, k, v)),
                                     schedule=schedule)
        err = (out.double().cpu() - ref).abs().max().item()
        print(f"ring_attention schedule={schedule}: max error vs float64 {err:.3e}")
        assert err < 5e-2, err
    cache = ShardedKVCache(CacheConfig(num_layers=1, q_heads=32, kv_heads=8, head_dim=128,
                                       capacity=8192, dtype=torch.bfloat16, device="cuda"))
    cache.prefill_chunk(0, *(t[:, :4095].to(dev, torch.bfloat16) for t in (q, k, v)))
    out = cache.decode(0, *(t[:, 4095:].to(dev, torch.bfloat16) for t in (q, k, v)))
    err = (out.double().cpu() - ref[:, 4095:]).abs().max().item()
    print(f"cache decode: max error vs float64 {err:.3e}")
    assert err < 5e-2, err
    dist.barrier()
    dist.destroy_process_group()
    print("nccl smoke: ok")


if __name__ == "__main__":
    main()
