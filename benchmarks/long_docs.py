"""Long-document jobs with Gemma-3-270M on 2 ranks (issue 25's three measurements).

    python benchmarks/long_docs.py questions   # (a) + (b): 10 questions about one ~16K doc
    python benchmarks/long_docs.py memory      # (c): 32K doc, full cache vs 10% + tiers

(a) one prefill + one batched decode of 10 questions (`ringmem infer --jobs`, one job with
    10 questions) against independent runs (one job per question, each prefilling the
    document): `--independent K` of the 10 are run and timed (each is the same prefill of
    the same document plus one question); the 10-run total is their mean x 10, reported as
    such beside the K measured times.
(b) the same 10-question job run twice with `--doc-cache` (the first run saves the
    document's cache, the second finds it): the time to the first answer of the second
    run against the first run's cold prefill.
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
    warm, _ = jobs("cached_warm", one, store)
    out["doc_cache"] = {"cold_document_s": cold[0]["document_s"],
                        "cold_first_answer_s": min(r["latency_s"] for r in cold),
                        "warm_load_s": warm[0]["document_s"],
                        "warm_first_answer_s": min(r["latency_s"] for r in warm),
                        "warm_hit": all(r["doc_cache"] == "hit" for r in warm),
                        "same_answers": [r["answer"] for r in sorted(cold, key=_qi)]
                        == [r["answer"] for r in sorted(warm, key=_qi)]}
    out["ratio (b)"] = (out["doc_cache"]["warm_first_answer_s"]
                        / out["doc_cache"]["cold_document_s"])
    out["key"] = key
    _save([out], "long_docs_questions")
    return out


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["questions", "memory"])
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--new", type=int, default=8)
    p.add_argument("--independent", type=int, default=3)
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--resume", action="store_true", help="memory: keep finished rows")
    a = p.parse_args()
    if a.part == "questions":
        a.tokens = a.tokens or 16000
        questions(a)
    else:
        a.tokens = a.tokens or 32000
        memory(a)


if __name__ == "__main__":
    main()
