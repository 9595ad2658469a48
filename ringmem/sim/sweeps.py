"""`ringmem bench sim`: simulator sweeps, a markdown report and PNG plots.

* efficiency vs GPUs: 1M tokens (strong scaling), 32 q / 8 kv heads, d=128, bf16, causal,
  8 GPUs per node (NVSwitch) and InfiniBand between nodes; every ring schedule over every
  GPU (kv, q, allgather: up to `--ring-max`, 1024 by default) beside Ulysses-in-node x
  each schedule across;
* efficiency vs sequence length on one node of 8;
* schedule-choice maps: the fastest option by K/V heads x context, one map per link;
* decode latency (one token against a sharded cache: local attention, then an all-gather
  of the partials and their merge) vs context and ranks.

Efficiency = the attention's FLOPs at the device's unmasked attention rate, shared by the
GPUs, / simulated time: the fraction of the kernel's peak the whole layer reaches. (The
published tables divide by one device's causal launch instead, which runs at the
profile's causal efficiency; against that baseline a ring of mostly unmasked blocks can
exceed 100%.)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..links import Interconnect
from .kernel import Library, load_library, load_profile, piece_flops
from .model import simulate
from .paths import benchmarks_dir, progress

HQ, HKV, D = 32, 8, 128


def _link(lib: Library, name: str) -> Interconnect:
    d = lib.links[name]
    return Interconnect(name=name, topology=d["topology"], bandwidth=d["bandwidth"],
                        latency=d["latency"])


def ideal_s(prof: Any, seq: int, gpus: int) -> float:
    """Causal attention's FLOPs at the unmasked forward rate, split over `gpus`."""
    return piece_flops(seq, seq, seq * (seq + 1) / 2, HQ, 1, D, "fwd") / prof.fwd_flops / gpus


def _net(lib: Library, world: int) -> dict[str, Any]:
    """8 GPUs per node on NVSwitch, nodes over InfiniBand."""
    if world <= 8:
        return {"intra": _link(lib, "h800-nvswitch")}
    return {"intra": _link(lib, "h800-nvswitch"), "inter": _link(lib, "ib-ndr"),
            "per_node": 8}


def gpus_sweep(lib: Library, prof: Any, worlds: list[int], seq: int,
               ring_max: int) -> list[dict]:
    rows = []
    jobs = []
    for w in worlds:
        jobs += [(w, o) for o in ("kv", "q", "allgather")] if w <= ring_max else []
        if 1 < w <= 8:
            jobs.append((w, "ulysses"))  # Ulysses inside the node
        elif w > 8:  # Ulysses inside nodes (or groups of 4 nodes), a ring across them
            u = 8 if w // 8 <= ring_max else HQ
            jobs += [(w, f"ulysses{u}+{s}") for s in ("kv", "q", "allgather")]
    for w, opt in progress(jobs, "sim: GPUs"):
        r = simulate((1, seq // w, HQ, D), (1, seq // w, HKV, D), world=w, profile=prof,
                     option=opt, **_net(lib, w))
        ideal = ideal_s(prof, seq, w)
        rows.append({"gpus": w, "option": opt, "time_s": r.time_s,
                     "efficiency": ideal / r.time_s})
    return rows


def seq_sweep(lib: Library, prof: Any, seqs: list[int]) -> list[dict]:
    rows = []
    jobs = [(s, o) for s in seqs for o in ("kv", "q", "allgather", "ulysses", "ulysses4+kv")]
    for s, opt in progress(jobs, "sim: sequence"):
        r = simulate((1, s // 8, HQ, D), (1, s // 8, HKV, D), world=8, profile=prof,
                     option=opt, **_net(lib, 8))
        rows.append({"seq": s, "option": opt, "time_s": r.time_s,
                     "efficiency": ideal_s(prof, s, 8) / r.time_s})
    return rows


def choice_maps(lib: Library, prof: Any, contexts: list[int], kv_heads: list[int],
                links: list[str]) -> list[dict]:
    rows = []
    jobs = [(ln, h, c) for ln in links for h in kv_heads for c in contexts]
    for ln, h, c in progress(jobs, "sim: choice maps"):
        ic = _link(lib, ln)
        best = None
        for opt in ("kv", "q", "allgather", "ulysses", "ulysses2+kv"):
            t = simulate((1, c // 8, HQ, D), (1, c // 8, h, D), world=8, profile=prof,
                         intra=ic, option=opt).time_s
            if best is None or t < best[1]:
                best = (opt, t)
        rows.append({"link": ln, "kv_heads": h, "context": c, "best": best[0],
                     "time_s": best[1]})
    return rows


def decode_sweep(lib: Library, prof: Any, contexts: list[int], worlds: list[int]
                 ) -> list[dict]:
    """One new token against a sharded cache, as ringmem's decode does it: every rank
    attends to its C/W keys (the kernel time of plan()'s one-rank block), then the
    partials (out + lse per query head) are all-gathered and merged."""
    from ..links import Cluster
    rows = []
    for c, w in progress([(c, w) for c in contexts for w in worlds], "sim: decode"):
        local = simulate((1, 1, HQ, D), (1, c // w, HKV, D), world=1, profile=prof,
                         option="kv", causal=False, intra=_link(lib, "h800-nvswitch"))
        net = _net(lib, w)
        # `cache.decode.merge_across_ranks`: out, lse and a 3-number digest, packed as fp64
        part = (HQ * D + HQ + 3) * 8
        msgs = [(a, b, part) for a in range(w) for b in range(w) if a != b]
        gather = Cluster(w, net["intra"], net.get("inter"), net.get("per_node", 0)).time(msgs)
        merge = prof.epilogue_s(w * HQ * D, 6 * 4)
        rows.append({"context": c, "gpus": w, "latency_s": local.time_s + gather + merge,
                     "local_s": local.time_s, "gather_s": gather})
    return rows


def plot(res: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG plots (matplotlib, imported here: an optional dependency)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []

    def save(fig, name: str) -> None:
        p = out_dir / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    for key, x, title, name in (("gpus", "gpus", "1M tokens, strong scaling", "sim_gpus.png"),
                                ("seq", "seq", "8 GPUs (one node)", "sim_seq.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for opt in dict.fromkeys(r["option"] for r in res[key]):
            pts = [(r[x], r["efficiency"]) for r in res[key] if r["option"] == opt]
            ax.plot(*zip(*pts), marker="o", label=opt)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs" if x == "gpus" else "sequence length (tokens)")
        ax.set_ylabel("fraction of the attention peak")
        ax.set_title(f"{res['profile']}: {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, name)
    maps = res["maps"]
    links = list(dict.fromkeys(r["link"] for r in maps))
    opts = sorted({r["best"] for r in maps})
    fig, axes = plt.subplots(1, len(links), figsize=(4.2 * len(links), 3.6), squeeze=False)
    for ax, ln in zip(axes[0], links):
        cs = sorted({r["context"] for r in maps})
        hs = sorted({r["kv_heads"] for r in maps})
        grid = [[opts.index(next(r["best"] for r in maps if r["link"] == ln and
                                 r["kv_heads"] == h and r["context"] == c)) for c in cs]
                for h in hs]
        ax.imshow(grid, cmap="tab10", vmin=0, vmax=9, origin="lower", aspect="auto")
        for i in range(len(hs)):
            for j in range(len(cs)):
                ax.text(j, i, opts[grid[i][j]], ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(cs)), [f"{c // 1024}K" for c in cs])
        ax.set_yticks(range(len(hs)), [str(h) for h in hs])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("K/V heads (32 q heads)")
        ax.set_title(f"fastest option, 8 GPUs, {ln}", fontsize=9)
    save(fig, "sim_choice.png")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for c in sorted({r["context"] for r in res["decode"]}):
        pts = [(r["gpus"], 1e3 * r["latency_s"]) for r in res["decode"] if r["context"] == c]
        ax.plot(*zip(*pts), marker="o", label=f"{c // 1024}K tokens")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("decode latency per token per layer (ms)")
    ax.set_title(f"{res['profile']}: decode, one token (local + all-gather merge)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "sim_decode.png")
    return paths


def run_sweeps(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ringmem bench sim", description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="H800-FA2",
                   help="a profile of published.json or a calibrated profile file")
    p.add_argument("--quick", action="store_true", help="small sweeps (a smoke run)")
    p.add_argument("--max-gpus", type=int, default=1024)
    p.add_argument("--ring-max", type=int, default=1024,
                   help="largest world for ring options over every GPU (plan() routes "
                        "and times every rank at each step at once: 1024 GPUs take seconds)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    if a.max_gpus < 1 or a.max_gpus & (a.max_gpus - 1):
        raise ValueError(f"--max-gpus must be a power of two >= 1, got {a.max_gpus}")
    lib = load_library()
    prof = lib.profiles.get(a.profile) or load_profile(a.profile)
    out = Path(a.out_dir) if a.out_dir else benchmarks_dir() / "results"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    q = a.quick
    worlds = [2 ** i for i in range(11) if 2 ** i <= (16 if q else a.max_gpus)]
    res = {"profile": prof.name, "config": {"hq": HQ, "hkv": HKV, "d": D, "dtype": "bf16",
                                            "causal": True, "quick": q},
           # what the efficiencies rest on: one device's unmasked and causal rates
           "rates": {"unmasked_tflops": prof.fwd_flops / 1e12,
                     "causal_efficiency": prof.causal_efficiency,
                     "sources": list(prof.sources)}}
    res["gpus"] = gpus_sweep(lib, prof, worlds, 1 << (17 if q else 20), a.ring_max)
    res["seq"] = seq_sweep(lib, prof, [1 << i for i in ((13, 15) if q else
                                                        (13, 15, 17, 19, 21, 22))])
    res["maps"] = choice_maps(lib, prof, [1 << i for i in ((14, 17) if q else (14, 17, 20))],
                              [1, 8] if q else [1, 2, 8, 32],
                              ["h800-nvswitch", "a10-pcie", "ib-ndr"])
    res["decode"] = decode_sweep(lib, prof, [1 << i for i in ((17,) if q else (17, 20, 22))],
                                 [w for w in worlds if w <= 64])
    res["seconds"] = time.time() - t0
    name = "sim_sweeps_quick" if q else "sim_sweeps"
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    plots = [] if a.no_plots else plot(res, out)
    from .sweep_report import write
    write(res, out / f"{name}.md", plots)
    print(f"sim: {len(res['gpus']) + len(res['seq']) + len(res['maps']) + len(res['decode'])}"
          f" points in {res['seconds']:.0f} s -> {out / (name + '.md')}")
    return 0
