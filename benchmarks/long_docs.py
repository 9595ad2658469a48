"""Long-document jobs with Gemma-3-270M on 2 ranks (issue 25's three measurements).

    python benchmarks/long_docs.py questions   # (a) + (b): 10 questions about one ~16K doc
    python benchmarks/long_docs.py memory      # (c): 32K doc, full cache vs 10% + tiers

(a) one prefill + one batched decode of 10 questions (`ringmem infer --jobs`, one job with
    10 questions) against independent runs (one job per question, each prefilling the
    document): `--independent K` of the 10 are run and timed (each is the same prefill of
    the same document plus one question); the 10-run total is their mean x 10, reported as
    such beside the K measured times.
(b) the same 10-question job run with `--doc-cache`, once cold (it prefills the document
    and saves its cache) then `--warm K` times warm (each finds it on disk): the median
    warm run's time to its first answer against the cold run's document prefill (every
    warm time is reported).
(c) `ringmem infer` on a 32K-token document at 5 pass-key depths, with the full cache and
    with question-agnostic SnapKV to 10% during prefill + a host tier: per-rank peak
    memory, KV pool bytes allocated, tier bytes, and whether the key was found.

Every run is a real `ringmem infer` process (torchrun, gloo); rows are appended to
benchmarks/results/long_docs.json as each finishes, then long_docs.md is written.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit, machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
QUESTIONS = ["What is the pass key?", "Who built the ark?", "Who led the people out of Egypt?",
             "What did God create in the beginning?", "Who was the first king of Israel?",
             "Where was Jesus born?", "Who was swallowed by a great fish?",
             "How many days and nights did the flood rain fall?",
             "Who killed Goliath?", "What is the first book of the Bible?"]


def _run(args: list[str], log: Path) -> tuple[str, float]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "ringmem.cli", "infer", "--nproc", "2", *args],
                         capture_output=True, text=True, cwd=ROOT)
    log.write_text(res.stdout + "\n---- stderr ----\n" + res.stderr[-20000:])
    if res.returncode != 0:
        raise SystemExit(f"ringmem infer {' '.join(args)} failed (log: {log}):\n"
                         f"{res.stderr[-3000:]}")
    return res.stdout, time.perf_counter() - t0


def _document(tokens: int, depth: float, seed: int) -> tuple[str, str]:
    from ringmem.demo import haystack, models
    tok = models.load_tokenizer(models.GEMMA3)
    return haystack.passkey_document(tok, tokens=tokens, depth=depth, seed=seed,
                                     offset=seed * 997 % 20000, preamble=False)


def _save(rows: list[dict], name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1))


def _meta() -> dict:
    return {"machine": machine(), "commit": git_commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def questions(a: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="long-docs-"))
    text, key = _document(a.tokens, 0.5, 0)
    doc = work / "doc.txt"
    doc.write_text(text)
    common = ["--model", "gemma3-270m", "--max-context", "32768", "--chunk-size", "2048",
              "--answer-prefix", "Answer:", "--max-new-tokens", str(a.new)]
    out: dict = {"config": {"tokens": a.tokens, "questions": len(QUESTIONS),
                            "max_new_tokens": a.new, "chunk": 2048, "ranks": 2,
                            "dtype": "float32", "cache": "full"}, **_meta()}

    def jobs(name: str, lines: list[dict], extra: list[str]) -> tuple[list[dict], float]:
        f = work / f"{name}.jsonl"
        f.write_text("".join(json.dumps(x) + "\n" for x in lines))
        answers = work / f"{name}.answers.jsonl"
        _, wall = _run([*common, "--jobs", str(f), "--output", str(answers), *extra],
                       work / f"{name}.log")
        return _records(answers), wall

    one = [{"id": "doc", "document": str(doc), "questions": QUESTIONS}]
    recs, wall = jobs("batched", one, [])
    out["batched"] = {"wall_s": wall, "document_s": recs[0]["document_s"],
                      "last_answer_s": max(r["latency_s"] for r in recs),
                      "first_answer_s": min(r["latency_s"] for r in recs),
                      "answers": {r["question_index"]: r["answer"] for r in recs}}
    print("batched:", json.dumps(out["batched"])[:300], flush=True)
    times = []
    for i in range(a.independent):
        recs, _ = jobs(f"single{i}", [{"id": f"q{i}", "document": str(doc),
                                       "questions": [QUESTIONS[i]]}], [])
        times.append(recs[0]["latency_s"])
        print(f"independent {i}: {times[-1]:.1f} s", flush=True)
    mean = sum(times) / len(times)
    out["independent"] = {"measured_s": times, "mean_s": mean,
                          "ten_runs_s (mean x 10)": 10 * mean}
    out["speedup (a)"] = 10 * mean / out["batched"]["last_answer_s"]
    store = ["--doc-cache", "--doc-cache-dir", str(work / "doc-caches")]
    cold, _ = jobs("cached_cold", one, store)
    warms = [jobs(f"cached_warm{i}", one, store)[0] for i in range(a.warm)]
    firsts = [min(r["latency_s"] for r in w) for w in warms]
    out["doc_cache"] = {"cold_document_s": cold[0]["document_s"],
                        "cold_first_answer_s": min(r["latency_s"] for r in cold),
                        "warm_load_s": [w[0]["document_s"] for w in warms],
                        "warm_question_prefill_s": [w[0]["question_prefill_s"]
                                                    for w in warms],
                        "warm_first_answers_s": firsts,
                        "warm_first_answer_s": sorted(firsts)[len(firsts) // 2],
                        "warm_hit": all(r["doc_cache"] == "hit" for w in warms for r in w),
                        "same_answers": all([r["answer"] for r in sorted(cold, key=_qi)]
                                            == [r["answer"] for r in sorted(w, key=_qi)]
                                            for w in warms)}
    out["ratio (b)"] = (out["doc_cache"]["warm_first_answer_s"]
                        / out["doc_cache"]["cold_document_s"])
    out["key"] = key
    _save([out], "long_docs_questions")
    return out


def _each(xs: float | list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in (xs if isinstance(xs, list) else [xs]))


def _qi(r: dict) -> int:
    return r["question_index"]


def _configs(work: Path) -> dict[str, Path]:
    """configs/infer_gemma3.toml as is, and without its eviction and tier keys."""
    base = (ROOT / "configs" / "infer_gemma3.toml").read_text().splitlines()
    drop = ("eviction", "snapkv_kernel", "budget", "compress", "tier_")
    full = [x for x in base if not x.startswith(drop)]
    out = {"snapkv10+tiers": ROOT / "configs" / "infer_gemma3.toml",
           "full": work / "full.toml"}
    out["full"].write_text("\n".join(full) + "\n")
    return out


def memory(a: argparse.Namespace) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="long-docs-mem-"))
    configs = _configs(work)
    rows = []
    prev = RESULTS / "long_docs_memory.json"
    if a.resume and prev.is_file():
        rows = json.loads(prev.read_text())
    for depth in a.depths:
        for setting in ("full", "snapkv10+tiers"):
            if any(r["depth"] == depth and r["setting"] == setting for r in rows):
                continue
            args = ["--config", str(configs[setting]), "--haystack-tokens", str(a.tokens),
                    "--passkey-depth", str(depth)]
            out, wall = _run(args, work / f"{setting}-{depth}.log")
            ranks = [_rank_line(x) for x in out.splitlines() if x.startswith("[rank")]
            rows.append({"depth": depth, "setting": setting, "tokens": a.tokens,
                         "wall_s": wall, "found": ": correct" in out, "ranks": ranks,
                         "answer": next((x for x in out.splitlines()
                                         if x.startswith("answer")), ""),
                         "ttft": next((x for x in out.splitlines()
                                       if x.startswith("time to first")), ""),
                         **_meta()})
            print(json.dumps(rows[-1])[:400], flush=True)
            _save(rows, "long_docs_memory")
    return rows


_MIB = re.compile(r"\[rank (\d+)/\d+\] peak memory (\d+) MiB, KV cache ([\d.]+) MiB allocated "
                  r"\(([\d.]+) MiB in use\)(?:.*host ([\d.]+) MiB, disk ([\d.]+) MiB, "
                  r"pending ([\d.]+) MiB)?")


def _rank_line(line: str) -> dict:
    m = _MIB.search(line)
    if m is None:
        return {"line": line}
    r, peak, pool, used, host, disk, pend = m.groups()
    return {"rank": int(r), "peak_mib": int(peak), "pool_mib": float(pool),
            "in_use_mib": float(used), "host_mib": float(host or 0),
            "disk_mib": float(disk or 0), "pending_mib": float(pend or 0)}


def report() -> str:
    """benchmarks/results/long_docs.md from the two JSON files (whatever has run)."""
    lines = ["# Long-document jobs: Gemma-3-270M, 2 ranks (gloo, CPU)", "",
             "Produced by `python benchmarks/long_docs.py questions|memory` (then `report`); "
             "raw rows in long_docs_questions.json and long_docs_memory.json. Every run is a "
             "real `ringmem infer` process; float32; nothing here was fitted.", ""]
    q = RESULTS / "long_docs_questions.json"
    if q.is_file():
        r = json.loads(q.read_text())[0]
        b, ind, dc = r["batched"], r["independent"], r["doc_cache"]
        lines += [f"## (a), (b): 10 questions about one {r['config']['tokens']}-token document",
                  "", f"Commit {r['commit']}, {r['date']}, {r['machine']}.", "",
                  "| run | seconds |", "|---|---|",
                  f"| one prefill + one batched decode of 10 questions: last answer | "
                  f"{b['last_answer_s']:.1f} (document prefill {b['document_s']:.1f}) |",
                  f"| independent runs (document + 1 question each), measured | "
                  f"{', '.join(f'{t:.1f}' for t in ind['measured_s'])} |",
                  f"| 10 independent runs (their mean x 10) | "
                  f"{ind['ten_runs_s (mean x 10)']:.1f} |",
                  f"| **(a) speed-up** (target >= 5x) | **{r['speedup (a)']:.1f}x** |",
                  f"| cold run with --doc-cache: document prefill (then saved) | "
                  f"{dc['cold_document_s']:.1f} |",
                  f"| warm runs: cache found on disk and loaded | {_each(dc['warm_load_s'])} |",
                  f"| warm runs: the 10 questions' prefill (packed in one chunk) | "
                  f"{_each(dc.get('warm_question_prefill_s', []))} |",
                  f"| warm runs: first answer | {_each(dc.get('warm_first_answers_s', []))} "
                  f"(median {dc['warm_first_answer_s']:.2f}) |",
                  f"| **(b) first answer / cold prefill** (target <= 0.10) | "
                  f"**{r['ratio (b)']:.3f}** (hit: {dc['warm_hit']}, same answers as the "
                  f"cold run: {dc['same_answers']}) |", "",
                  "Answers (greedy, max 8 new tokens, base model): "
                  + "; ".join(f"{k}: {v!r}" for k, v in sorted(b["answers"].items(),
                                                               key=lambda kv: int(kv[0]))), ""]
    m = RESULTS / "long_docs_memory.json"
    if m.is_file():
        rows = json.loads(m.read_text())
        lines += ["## (c): a 32K-token document, full cache vs SnapKV 10% during prefill + host "
                  "tier", "", f"Commit {rows[0]['commit']}, {rows[0]['date']}. "
                  "configs/infer_gemma3.toml (tokens from the command line), and the same "
                  "without its eviction and tier keys. MiB per rank: KV pools allocated "
                  "(window layers' pools included: 15 of 18 layers, the same in both), "
                  "in use, host tier, peak RSS (model weights included).", "",
                  "| depth | setting | pass key | KV allocated r0 / r1 | in use r0 / r1 | "
                  "host tier r0 / r1 | peak RSS r0 / r1 | wall s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            k = r["ranks"]
            f = lambda name: " / ".join(f"{x.get(name, 0):.1f}" for x in k)  # noqa: E731
            lines.append(f"| {r['depth']} | {r['setting']} | {'found' if r['found'] else 'missed'}"
                         f" ({r['answer'].removeprefix('answer: ')[:30]}) | {f('pool_mib')} | "
                         f"{f('in_use_mib')} | {f('host_mib')} | {f('peak_mib')} | "
                         f"{r['wall_s']:.0f} |")
        full = [x["pool_mib"] for r in rows if r["setting"] == "full" for x in r["ranks"]]
        ev = [x["pool_mib"] for r in rows if r["setting"] != "full" for x in r["ranks"]]
        if full and ev:
            lines += ["", f"KV pools allocated: full {max(full):.1f} MiB per rank, evicted "
                      f"{max(ev):.1f} MiB: **{max(full) / max(ev):.2f}x less** (target >= 3x)."]
    text = "\n".join(lines) + "\n"
    (RESULTS / "long_docs.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["questions", "memory", "report"])
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--new", type=int, default=8)
    p.add_argument("--independent", type=int, default=3)
    p.add_argument("--warm", type=int, default=3, help="questions: warm doc-cache runs")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--resume", action="store_true", help="memory: keep finished rows")
    a = p.parse_args()
    if a.part == "questions":
        a.tokens = a.tokens or 16000
        questions(a)
    elif a.part == "memory":
        a.tokens = a.tokens or 32000
        memory(a)
    print(report())


if __name__ == "__main__":
    main()
