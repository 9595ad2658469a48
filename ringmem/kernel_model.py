"""The block cost model `plan()` predicts with: one attention launch's time from its rows,
keys and scores, memory-bound passes at a copy rate, the host's own per-step and per-call
work, and the default model per device type (`timeline.BlockTimes`; the simulator's
measured alternative is `sim.kernel.Profile`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class KernelModel:
    """Time of one block-attention launch: launch + FLOPs / (flops * efficiency) + pairs x
    heads x pair_s (the softmax's per-score work, whatever the head size) + bytes read /
    mem_bw (what a one-row decode block is bound by); a backward block costs bwd_ratio
    times its forward. A block of n = min(rows, keys) reaches n / (n + half) of the peak
    rate (a fused kernel's tiles and pipeline fill make small blocks slower: why splitting
    the work hurts). dense_bands: a banded piece (a window, not the plain causal triangle)
    costs every rows x keys score (the CPU op takes the band as an explicit bias)."""
    flops: float
    launch: float = 0.0
    half: float = 0.0
    copy_bw: float = math.inf  # bytes/s of a local copy (the all-to-all's packing)
    step_s: float = 0.0  # host seconds per ring step on every rank (`timeline.BlockTimes`)
    call_s: float = 0.0  # host seconds per call (checks, the cross-rank agreement)
    cores: int = 0  # cores the ranks of one node share, one thread each (0: a device each)
    pair_s: float = 0.0
    mem_bw: float = math.inf
    bwd_ratio: float = 2.5
    dense_bands: bool = False
    cpu_tiles: bool = False
    """A causal piece costs the scores PyTorch's CPU flash op computes, whole tiles of
    them (`cpu_causal_scores`): at 512 keys or fewer a causal square costs a full one."""
    agree_s: tuple[float, ...] = ()
    """The cross-rank agreement's seconds per call at worlds 2, 3, ... (measured by
    `ringmem bench calibrate --host`; beyond the table: the last two extended linearly)."""
    a2a_s: tuple[float, ...] = ()
    """An all-to-all's seconds beyond one message's latency, in groups of 2, 3, ... ranks
    (measured by `ringmem bench calibrate --host`, where a group of more ranks than cores
    waits for cores; beyond the table: extended linearly)."""
    shared_latency: bool = False
    """A message's latency grows like the compute where more ranks than cores share the
    node (the peer must get a core: measured 1.5x at 3 gloo ranks on 2 cores)."""

    def on_node(self, ranks: int) -> KernelModel:
        """This model for `ranks` ranks of one node sharing its `cores`: more ranks than
        cores run in turns, so every rank's compute and host work slow by ranks / cores
        (on 2 cores, 4 gloo ranks each compute at half a core's rate)."""
        share = ranks / self.cores if self.cores else 1.0
        if share <= 1.0:
            return self
        # a table entry of g ranks was measured with max(1, g / cores) of them per core
        a2a = tuple(a * share / max(1.0, (g + 2) / self.cores)
                    for g, a in enumerate(self.a2a_s))
        return replace(self, flops=self.flops / share, launch=self.launch * share, a2a_s=a2a,
                       copy_bw=self.copy_bw / share, step_s=self.step_s * share,
                       pair_s=self.pair_s * share, mem_bw=self.mem_bw / share, cores=0)

    def agreement(self, world: int) -> float:
        """`agree_s` at `world` (0 alone)."""
        return _at(self.agree_s, world)

    def all_to_all(self, ranks: int) -> float:
        """`a2a_s` for a group of `ranks` (0 alone)."""
        return _at(self.a2a_s, ranks)

    def time(self, rows: int, keys: int, pairs: float, heads: int, dim: int, batch: float,
             backward: bool, kv_heads: int = 0, itemsize: int = 2) -> float:
        ratio = self.bwd_ratio if backward else 1.0
        work = pairs * heads * batch * ratio
        n = min(rows, keys)
        t = self.launch + 4 * work * dim / (self.flops * (n / (n + self.half)
                                                          if self.half else 1.0))
        t += work * self.pair_s
        if self.mem_bw != math.inf:  # q, out, k, v once each
            read = (2 * rows * heads + 2 * keys * (kv_heads or heads)) * dim * batch
            t += read * itemsize * ratio / self.mem_bw
        return t

    def block_s(self, rows: int, keys: int, pairs: float, heads: int, batch: int, d: int,
                phase: str, kv_heads: int = 0, itemsize: int = 2) -> float:
        """`time` as `timeline.BlockTimes` asks for it (an empty piece: no launch)."""
        if pairs <= 0 or rows <= 0 or keys <= 0:
            return 0.0
        return self.time(rows, keys, pairs, heads, d, batch, phase == "bwd", kv_heads,
                         itemsize)

    def epilogue_s(self, elems: float, per_elem: float) -> float:
        """A memory-bound pass (the loop's merges and sums) at the local copy rate."""
        return elems * per_elem / self.copy_bw


def cpu_causal_scores(rows: int, keys: int) -> int:
    """Scores PyTorch's CPU flash op (`_scaled_dot_product_flash_attention_for_cpu` and its
    backward) computes for a causal (top-left) block: query tiles of 32, 64 or 256 rows (by
    the rows) each score every 512-key chunk up to the tile's last row. Measured on one
    thread (fp32, d=64, fwd and bwd alike): causal / full time 1.00 up to 512, 0.78 at
    768, 0.75 at 1024, 0.63 at 2048, 0.59 at 3072; this count gives 1, 0.778, 0.75,
    0.625, 0.583."""
    if rows <= 0 or keys <= 0:
        return 0
    qs = 256 if rows >= 768 else 64 if rows >= 192 else 32
    ks = min(512, keys)
    full, rest = divmod(rows, qs)
    ends = [qs * (t + 1) for t in range(full)] + ([rows] if rest else [])
    return sum((e - qs * t) * min(keys, -(-e // ks) * ks) for t, e in enumerate(ends))


def _at(table: tuple[float, ...], ranks: int) -> float:
    """A per-group-size table (2, 3, ... ranks) at `ranks`: 0 below 2, the last two
    entries extended linearly past its end (never below 0: a cost)."""
    if ranks < 2 or not table:
        return 0.0
    if ranks - 2 < len(table):
        return table[ranks - 2]
    slope = table[-1] - table[-2] if len(table) > 1 else table[-1]
    return max(0.0, table[-1] + slope * (ranks - 1 - len(table)))


# by device type, used when none is given: H100-class flash attention (half speed at
# 128-row blocks, ~5 us a launch, ~1.5 TB/s copies), and one CPU core of this project's
# machines (the ranks of a node share its cores: `on_node`), fitted with the "loopback"
# link by benchmarks/fit_cpu_model.py on two development runs of seed 0
# (benchmarks/results/auto_regret_dev4/; the fit: results/cpu_model_fit_tiles2.json) and
# judged on other seeds (benchmarks/validation_sets.md): 74.3 GFLOP/s, 0.86 ns per score
# (softmax), 3.2 GB/s reading a block's inputs, 0.17 ms a launch, backward 1.75 x
# forward, windows as a dense bias, causal pieces in the CPU op's whole tiles, copies at
# 2.6 GB/s, an all-to-all's fixed cost 0.97 / 4.26 ms in groups of 2 / 4 ranks, 0.88 ms
# of host work per ring step, none per call. The models before it
# (results/cpu_model_fit_tiles.json, results/cpu_model_fit.json) and one with the host's
# costs measured (`ringmem bench calibrate --host`: results/cpu_model_fit_host_a2a.json)
# are compared with it in docs/parallelism.md.
DEFAULT_KERNELS = {"cuda": KernelModel(400e12, 5e-6, 128.0, 1.5e12),
                   "cpu": KernelModel(74.3e9, 0.17e-3, 0.0, 2.6e9, step_s=0.88e-3,
                                      pair_s=0.86e-9, mem_bw=3.2e9, bwd_ratio=1.75,
                                      dense_bands=True, cpu_tiles=True,
                                      a2a_s=(0.97e-3, 2.62e-3, 4.26e-3))}
