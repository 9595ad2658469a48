"""One call to simulate: plan the option with `ringmem.plan` (routing, bytes, work), then
time it with the event simulation (`engine`) on a device profile and a network."""
from __future__ import annotations

from dataclasses import dataclass

from ..links import Cluster, Interconnect
from ..plan import Estimate
from ..timeline import Impl, PhaseResult, simulate_phase
from .kernel import Profile

ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


@dataclass
class SimResult:
    option: str
    time_s: float                 # the whole call (fwd, or fwd + bwd)
    phases: dict[str, PhaseResult]
    estimate: Estimate            # plan()'s Estimate the simulation used
    bytes_sent: int               # by all ranks, all phases (plan's count)


def _dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
            "fp64": torch.float64}[name]


def simulate(q_shape: tuple[int, int, int, int], kv_shape: tuple[int, int, int, int], *,
             world: int, profile: Profile, intra: Interconnect,
             inter: Interconnect | None = None, per_node: int = 0, duplex: bool = True,
             option: str = "kv", layout: str = "zigzag", causal: bool = True,
             backward: bool = False, dtype: str = "bf16", impl: Impl | None = None
             ) -> SimResult:
    """Simulate one attention layer. q_shape [B, S_local, Hq, D], kv_shape
    [B, S_local, Hkv, D] are per-rank shards as for `plan()`; option: a plan option name
    ("kv", "q", "allgather", "ulysses", "ulysses2+kv", ...); backward: forward + backward;
    impl: the loop's epilogue costs (default ringmem's).

    >>> simulate((1, 8192, 32, 128), (1, 8192, 8, 128), world=8, profile=p,
    ...          intra=INTERCONNECTS["nvswitch"], option="kv").time_s
    """
    from ..plan import parse_option, plan
    if dtype not in ITEMSIZE:
        raise ValueError(f"dtype must be one of {tuple(ITEMSIZE)}, got {dtype!r}")
    u, sched = parse_option(option, world)
    pl = plan(tuple(q_shape), tuple(kv_shape), world=world, dtype=_dtype(dtype),
              causal=causal, layout=layout, interconnect=intra, inter_node=inter,
              gpus_per_node=per_node if inter is not None else 0, backward=backward,
              flops=profile.fwd_flops, ulysses=u, schedule=sched)
    est = pl.schedules[option]
    net = Cluster(world, intra, inter, per_node if inter is not None else 0, duplex)
    itemsize, acc = ITEMSIZE[dtype], 8 if dtype == "fp64" else 4
    phases = {ph: simulate_phase(est, ph, profile, net, itemsize=itemsize, acc=acc,
                                  impl=impl)
              for ph in (("fwd", "bwd") if backward else ("fwd",))}
    return SimResult(option, sum(p.time_s for p in phases.values()), phases, est,
                     est.bytes())


def single_s(profile: Profile, seq: int, hq: int, d: int, *, batch: int = 1,
             causal: bool = True, backward: bool = False) -> float:
    """One device, one launch over the whole sequence (flash-attn's single-GPU call): the
    baseline of the published efficiency tables."""
    pairs = seq * (seq + 1) / 2 if causal else float(seq * seq)
    t = profile.block_s(seq, seq, pairs, hq, batch, d, "fwd")
    if backward:
        t += profile.block_s(seq, seq, pairs, hq, batch, d, "bwd")
    return t
