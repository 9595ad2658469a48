"""Kernel model: the time one backend launch takes, from its FLOPs and bytes.

A `Profile` describes one device running one attention backend:

* a roofline for the block kernel: `fwd_flops` / `bwd_flops` (FLOP/s on large unmasked
  blocks; the backward counted as 2.5x the forward's FLOPs, the Triton tutorial's
  convention), `causal_efficiency` (per-pair rate of a block whose mask cuts through it,
  relative to an unmasked one: diagonal tiles and uneven row lengths), wave quantisation
  over `units` parallel units (SMs) of `tile_rows` query rows (forward) or keys
  (backward) per head, and `launch_s` per
  launch (which makes two half blocks cost more than one whole one: the split penalty);
* `mem_bw` (B/s) for memory-bound work: `bwd_launch_bytes` per query element of every
  backward launch (FlashAttention-2's dO.O preprocessing and fp32 dq accumulator: paid
  once per launch, so a ring of many launches pays it many times), and the epilogue the
  ring loop adds to each block (the fp32 log-sum-exp merge of a partial output forward,
  the fp32 sum of gradients backward) whose bytes per element depend on the
  implementation (`ringmem.timeline.Impl`: ringmem's loop, or ring-flash-attn's, counted
  from their ops).

Profiles are data (JSON): measured by `ringmem bench calibrate`, or published figures with
their sources (`published.json`). Pure Python: no torch.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

PHASES = ("fwd", "bwd")
BWD_FLOP_FACTOR = 2.5  # backward FLOPs / forward FLOPs (5 matmuls of the 2 in the forward)


def piece_flops(rows: int, keys: int, pairs: float, heads: int, batch: int, d: int,
                phase: str) -> float:
    """FLOPs of one block: 2 matmuls of 2 FLOPs per (query, key) pair and channel."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    return 4.0 * pairs * d * heads * batch * (BWD_FLOP_FACTOR if phase == "bwd" else 1.0)


@dataclass(frozen=True, kw_only=True)
class Profile:
    """One device x backend. See the module docstring for the model."""
    name: str
    fwd_flops: float            # FLOP/s, forward, large unmasked blocks
    bwd_flops: float            # FLOP/s, backward (2.5x forward FLOPs per block)
    causal_efficiency: float = 1.0  # masked-through blocks: per-pair rate multiplier
    launch_s: float = 0.0       # per kernel launch
    step_s: float = 0.0         # host work per ring step on every rank (Python, posting)
    call_s: float = 0.0         # host work per call (checks, the cross-rank agreement)
    mem_bw: float = 1e12        # B/s for the merge / gradient-sum epilogue
    units: int = 1              # parallel units (SMs); 1: no wave quantisation
    tile_rows: int = 128        # query rows (fwd) / keys (bwd) per unit of work, per head
    bwd_launch_bytes: float = 0.0  # B per query element (rows x heads x d) per bwd launch
    sources: tuple[str, ...] = ()
    notes: str = ""
    # measured launches (phase, rows, keys, pairs, seconds, FLOPs): when present, the
    # unmasked rate is interpolated over log(rows) from them instead of one fwd/bwd figure
    table: tuple[tuple, ...] = ()

    def __post_init__(self) -> None:
        for n in ("fwd_flops", "bwd_flops", "mem_bw"):
            if not getattr(self, n) > 0:
                raise ValueError(f"{n} must be > 0, got {getattr(self, n)!r}")
        if not 0 < self.causal_efficiency <= 1.5:
            raise ValueError(f"causal_efficiency must be in (0, 1.5], got "
                             f"{self.causal_efficiency!r}")
        if self.launch_s < 0 or self.units < 1 or self.tile_rows < 1:
            raise ValueError(f"launch_s >= 0, units >= 1 and tile_rows >= 1 needed, got "
                             f"{self.launch_s!r}, {self.units!r}, {self.tile_rows!r}")
        for n in ("step_s", "call_s"):
            if not getattr(self, n) >= 0:
                raise ValueError(f"{n} must be >= 0, got {getattr(self, n)!r}")

    def terms(self, rows: int, keys: int, pairs: float, heads: int, batch: int, d: int,
              phase: str, kv_heads: int = 0, itemsize: int = 2) -> tuple[float, ...]:
        """(launch, FLOP time, read time, backward-launch memory time) of one launch."""
        rate = self.table_rate(phase, rows) or (self.fwd_flops if phase == "fwd"
                                                 else self.bwd_flops)
        if pairs < rows * keys:  # the mask cuts through the block
            rate *= self.causal_efficiency
        # FlashAttention-style grids: forward over query tiles, backward over key tiles
        work = math.ceil((rows if phase == "fwd" else keys) / self.tile_rows) * heads * batch
        waves = math.ceil(work / self.units)
        rate *= work / (waves * self.units)  # the last wave's idle units
        mem = rows * heads * batch * d * self.bwd_launch_bytes if phase == "bwd" else 0.0
        reads = (rows * heads + 2 * keys * kv_heads) * batch * d * itemsize
        return (self.launch_s, piece_flops(rows, keys, pairs, heads, batch, d, phase) / rate,
                reads / self.mem_bw, mem / self.mem_bw)

    def table_rate(self, phase: str, rows: int) -> float | None:
        """Unmasked FLOP/s at `rows` query rows, interpolated linearly in log(rows) between
        the measured launches (the nearest one outside their range); None without them."""
        pts = sorted((r, f / max(t - self.launch_s, 1e-12))
                     for ph, r, k, p, t, f in (e for e in self.table if len(e) == 6)
                     if ph == phase and p >= r * k)
        if not pts:
            return None
        if rows <= pts[0][0]:
            return pts[0][1]
        for (r0, a), (r1, b) in zip(pts, pts[1:]):
            if rows <= r1:
                w = 0.0 if r1 == r0 else math.log(rows / r0) / math.log(r1 / r0)
                return a + w * (b - a)
        return pts[-1][1]

    def block_s(self, rows: int, keys: int, pairs: float, heads: int, batch: int, d: int,
                phase: str, kv_heads: int = 0, itemsize: int = 2) -> float:
        """Seconds of one launch over `rows` x `keys` with `pairs` unmasked (query, key)
        pairs per batch row, `heads` query heads: the slower of its FLOPs and its reads of
        q and of K/V (`kv_heads`; what bounds decode, where rows = 1)."""
        if pairs <= 0 or rows <= 0 or keys <= 0:
            return 0.0
        launch, flop_s, read_s, mem_s = self.terms(rows, keys, pairs, heads, batch, d, phase,
                                                   kv_heads, itemsize)
        return launch + max(flop_s, read_s) + mem_s

    def epilogue_s(self, elems: float, per_elem: float) -> float:
        """Seconds of a memory-bound pass over `elems` elements at `per_elem` bytes each."""
        return elems * per_elem / self.mem_bw

    def all_to_all(self, ranks: int) -> float:
        """An all-to-all's fixed cost beyond its messages' latency: a profile measures
        none (`kernel_model.KernelModel.a2a_s` does)."""
        return 0.0

    def calibrated(self, seq: int, heads: int, d: int, fwd_s: float, fwd_bwd_s: float,
                   batch: int = 1, causal: bool = True) -> Profile:
        """This profile with fwd_flops / bwd_flops set so that one launch over `seq`
        tokens (the single-device call of a published table) takes `fwd_s` forward and
        `fwd_bwd_s` forward + backward, everything else of the model kept."""
        if not 0 < fwd_s < fwd_bwd_s:
            raise ValueError(f"need 0 < fwd_s < fwd_bwd_s, got {fwd_s!r}, {fwd_bwd_s!r}")
        pairs = seq * (seq + 1) / 2 if causal else float(seq * seq)
        rates = {}
        unit = replace(self, fwd_flops=1.0, bwd_flops=1.0)
        for phase, t in (("fwd", fwd_s), ("bwd", fwd_bwd_s - fwd_s)):
            launch, per, _, mem = unit.terms(seq, seq, pairs, heads, batch, d, phase)
            if not t > launch + mem:
                raise ValueError(f"{phase} time {t!r} s is below the profile's fixed costs "
                                 f"{launch + mem!r} s")
            rates[phase] = per / (t - launch - mem)  # compute-bound at these sizes
        return replace(self, fwd_flops=rates["fwd"], bwd_flops=rates["bwd"])

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["sources"], d["table"] = list(self.sources), [list(t) for t in self.table]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Profile:
        known = {f.name for f in fields(cls)}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown profile keys {sorted(extra)} in {d.get('name')!r}")
        d = dict(d)
        d["sources"] = tuple(d.get("sources", ()))
        d["table"] = tuple(tuple(t) for t in d.get("table", ()))
        return cls(**d)


@dataclass(frozen=True)
class Library:
    """Published device profiles and link figures, read from a JSON file."""
    profiles: dict[str, Profile] = field(default_factory=dict)
    links: dict[str, dict[str, Any]] = field(default_factory=dict)
    published: dict[str, Any] = field(default_factory=dict)
    # per profile or link: each input's kind (datasheet, kernel benchmark, assumption, ...)
    kinds: dict[str, dict[str, str]] = field(default_factory=dict)


def published_path() -> Path:
    return Path(__file__).with_name("published.json")


def load_library(path: str | Path | None = None) -> Library:
    """The profiles, links and published results in `path` (default: the shipped file)."""
    p = Path(path) if path is not None else published_path()
    return library_from(json.loads(p.read_text()))


def library_from(raw: dict[str, Any]) -> Library:
    """A `Library` from the parsed JSON of a library file (e.g. with one input changed)."""
    profiles, kinds = {}, {}
    for k, v in raw["profiles"].items():
        v = dict(v)
        kinds[k] = v.pop("kinds", {})
        cal = v.pop("calibration", None)
        prof = Profile.from_json({"name": k, "fwd_flops": 1.0, "bwd_flops": 1.0, **v})
        if cal is not None:  # rates from a published single-device time, through the model
            prof = prof.calibrated(cal["seq"], cal["heads"], cal["d"], 1 / cal["fwd_iters"],
                                   1 / cal["fwd_bwd_iters"], cal.get("batch", 1),
                                   cal.get("causal", True))
        profiles[k] = prof
    links = raw.get("links", {})
    kinds.update({k: v.get("kinds", {}) for k, v in links.items()})
    return Library(profiles, links, raw.get("published", {}), kinds)


def load_profile(path: str | Path) -> Profile:
    """A profile written by `ringmem bench calibrate` (or one entry of a library)."""
    raw = json.loads(Path(path).read_text())
    return Profile.from_json(raw.get("profile", raw))
