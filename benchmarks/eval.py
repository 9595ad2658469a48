"""Accuracy of KV compression on RULER-style tasks: `ringmem eval`, and kvpress on the same
samples, into benchmarks/results/eval_<preset>.md (+ .png, + _scores.json).

    python benchmarks/eval.py --preset smollm2-4k \\
        [--kvpress-python .venv-kvpress/bin/python] [--work DIR]

Phases, each resumable (run the same command again: answered questions are kept in
DIR/answers*.jsonl and not asked again):
1. the full cache on every task;
2. ringmem's policies at each keep, question-agnostic, on the tasks the full cache scores
   at least 50% on (the headline tasks: a small model fails the others whatever its cache
   holds; they are reported with the full cache alone);
3. kvpress's presses at the same keeps on the same samples (`eval_kvpress.py`, in the
   kvpress environment given by --kvpress-python; skipped without it, and said so);
   then ringmem's question-aware and streaming settings;
4. the report: `ringmem eval --report-only`'s tables under a header naming the machine,
   versions, commit, date, the preset and each phase's wall time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import git_commit, machine

PRESETS: dict[str, dict] = {
    "smollm2-4k": {"model": "smollm2-135m", "tokens": 4096, "samples": 2,
                   "keep": [0.1, 0.25, 0.5],
                   "aware": ["snapkv"],
                   # per-head kvzip left out: kvpress's KVzipPress pools all layers, as
                   # kvzip@global does, and it costs 60 s a document on 2 cores
                   "agnostic": ["snapkv", "keynorm", "expected", "kvzip@global"],
                   "streaming": ["snapkv", "keynorm", "expected"],
                   "presses": ["snapkv", "tova", "streaming", "expected", "knorm", "kvzip",
                               "adakv-snapkv", "adakv-expected"]},
    "gemma3-16k": {"model": "gemma3-270m", "tokens": 16384, "samples": 2,
                   "keep": [0.25, 0.5],
                   "aware": ["snapkv"], "agnostic": ["snapkv", "keynorm", "kvzip@global"],
                   "streaming": ["snapkv"], "presses": [],
                   "kvpress": "kvpress 0.5.5 cannot compress Gemma3ForCausalLM (see "
                   "eval_kvpress.SLIDING): no kvpress rows"},
}
ROOT = Path(__file__).resolve().parent


def run(cmd: list[str]) -> float:
    """Run a phase; its wall seconds (a failed phase stops the benchmark: rerun resumes)."""
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"{cmd[0]} ... failed: rerun the same command to resume")
    return time.perf_counter() - t0


def eval_cmd(pre: dict, work: Path) -> list[str]:
    """`ringmem eval` for the preset's model and length, into `work`."""
    return [sys.executable, "-m", "ringmem.cli", "eval", "--model", pre["model"],
            "--tokens", str(pre["tokens"]), "--out", str(work)]


def headline_tasks(work: Path) -> list[str]:
    rows = json.loads((work / "scores.json").read_text())
    full: dict[str, list[float]] = {}
    for r in rows:
        if r["setting"] == "full":
            full.setdefault(r["task"], []).append(r["score"])
    return sorted(t for t, v in full.items() if 100 * sum(v) / len(v) >= 50)


def timing(work: Path, samples: int, settings: list[str]) -> list[str]:
    """Mean seconds per job from the answers (first question's record): ringmem's document
    (prefill, scoring, compression; 2 ranks) and to the last answer; kvpress's whole run."""
    per: dict[tuple[str, str], list[tuple[float | None, float]]] = {}
    for name in ("answers.jsonl", "answers_kvpress.jsonl"):
        f = work / name
        for line in (f.read_text().splitlines() if f.exists() else []):
            r = json.loads(line)
            _, i, setting, policy, _ = r["id"].split(":")
            if r.get("question_index") != 0 or int(i) >= samples or "error" in r or \
                    setting not in ("full", "kvpress", *settings):
                continue
            per.setdefault((setting, policy), []).append(
                (r.get("document_s"), r.get("latency_s", r.get("seconds", 0.0))))
    lines = ["", "| setting | policy | jobs | document s (mean) | to the last answer s (mean) |",
             "|---|---|---|---|---|"]
    for (setting, policy), xs in sorted(per.items()):
        docs = [d for d, _ in xs if d is not None]
        doc = f"{sum(docs) / len(docs):.1f}" if docs else "-"
        lines.append(f"| {setting} | {policy} | {len(xs)} | {doc} | "
                     f"{sum(t for _, t in xs) / len(xs):.1f} |")
    return lines + ["", "Seconds on this machine: ringmem on 2 gloo ranks (document: prefill, "
                    "scoring, compression), kvpress in one process (its whole run: prefill, "
                    "compression and every answer); other work on the machine inflates both."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--kvpress-python", dest="kvpress", default=None,
                   help="the python of a virtual environment with kvpress 0.5.5")
    p.add_argument("--settings", nargs="+", default=["agnostic", "aware", "streaming"],
                   choices=["agnostic", "aware", "streaming"],
                   help="ringmem's settings to run and report (the full cache and kvpress "
                   "always)")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="tasks of the full-cache phase (default: every task); the compressed "
                   "runs take those of them the full cache scores >= 50% on")
    p.add_argument("--report-only", action="store_true", dest="report_only",
                   help="run nothing: write the report from the answers in --work (after an "
                   "interrupted run: it says which rows are missing by leaving them out)")
    p.add_argument("--work", default=None, help="working directory (default: a folder "
                   "under ~/.cache/ringmem/eval: the jobs hold every context, too big to keep)")
    a = p.parse_args()
    pre = PRESETS[a.preset]
    work = Path(a.work or Path.home() / ".cache" / "ringmem" / "eval" / a.preset)
    work.mkdir(parents=True, exist_ok=True)
    ev = eval_cmd(pre, work)
    if a.report_only:
        return write_report(a, pre, work, headline_tasks(work), {})
    walls = {"full cache": run(ev + ["--samples", str(pre["samples"]), "--policies"]
                               + (["--tasks", *a.tasks] if a.tasks else []))}
    tasks = headline_tasks(work)
    keep = [str(k) for k in pre["keep"]]
    part = ev + ["--samples", str(pre["samples"]), "--keep", *keep, "--tasks", *tasks]
    # the agnostic setting and kvpress (the targets) first, the aware setting last
    if tasks and "agnostic" in a.settings:
        walls["ringmem, agnostic"] = run(part + ["--settings", "agnostic",
                                                 "--policies", *pre["agnostic"]])
    if a.kvpress and tasks and pre["presses"]:  # DIR/jobs.jsonl: the headline tasks
        from ringmem.demo.models import model_path
        walls["kvpress"] = run([a.kvpress, str(ROOT / "eval_kvpress.py"), "--out", str(work),
                                "--model-dir", str(model_path(pre["model"])),
                                "--presses", *pre["presses"], "--keep", *keep])
    for setting in ("aware", "streaming"):
        if tasks and setting in a.settings:
            walls[f"ringmem, {setting}"] = run(part + ["--settings", setting,
                                                       "--policies", *pre[setting]])
    write_report(a, pre, work, tasks, walls)


def write_report(a: argparse.Namespace, pre: dict, work: Path, tasks: list[str],
                 walls: dict[str, float]) -> None:
    ev = eval_cmd(pre, work)
    body = subprocess.run(ev + ["--report-only", "--samples", str(pre["samples"]),
                                "--settings", *a.settings],
                          capture_output=True, text=True, check=True).stdout
    import torch
    import transformers
    kvp = (subprocess.run([a.kvpress, "-c", "import kvpress, transformers; print("
                           "kvpress.__version__ if hasattr(kvpress, '__version__') else "
                           "'0.5.5', transformers.__version__)"], capture_output=True,
                          text=True).stdout.split() if a.kvpress else [])
    head = [f"# eval {a.preset}: {pre['model']}, {pre['tokens']} tokens", "",
            f"- date: {datetime.date.today()}, commit {git_commit()}",
            f"- machine: {machine()}",
            f"- torch {torch.__version__}, transformers {transformers.__version__}; "
            + (f"kvpress {kvp[0]} with transformers {kvp[1]} (its own environment)"
               if len(kvp) == 2 and pre["presses"] else
               f"kvpress: not run ({pre.get('kvpress', 'no --kvpress-python')})"),
            f"- preset: {json.dumps(pre)}",
            f"- headline tasks (full cache >= 50%): {', '.join(tasks) or 'none'}: compressed "
            f"runs on those; the full cache on "
            f"{'the tasks ' + ', '.join(a.tasks) if a.tasks else 'every task'}; samples "
            f"0..{pre['samples'] - 1}",
            f"- ringmem settings run and reported: {', '.join(a.settings)}",
            "- wall time per phase (s) of this run (answers kept from an earlier run of the "
            "same command are not asked again): "
            + (", ".join(f"{k} {v:.0f}" for k, v in walls.items()) or "none (--report-only)"),
            "- 2 gloo ranks for ringmem (float32); kvpress one process, float32, greedy.",
            "- keep: ringmem's budget, the share of the document each (layer, KV head) "
            "keeps (`@global`: pooled over all); kvpress's compression_ratio = 1 - keep, "
            "per layer (KVzipPress pooled over all layers). ringmem `agnostic` compresses "
            "once the document is prefilled, as kvpress's pipeline does; `streaming` after "
            "every 1024-token chunk (no kvpress counterpart); `aware` after reading the "
            "question. The first 4 and last 32 document tokens are kept inside ringmem's "
            "budget. Details: docs/eval.md.", ""]
    out = ROOT / "results" / f"eval_{a.preset}"
    text = ("\n".join(head) + "\n" + body.split("\n", 1)[1]
            + "\n".join(timing(work, pre["samples"], a.settings)) + "\n")
    out.with_suffix(".md").write_text(text)
    if (work / "accuracy.png").exists():
        shutil.copy(work / "accuracy.png", out.with_suffix(".png"))
    shutil.copy(work / "scores.json", str(out) + "_scores.json")
    print(text)


if __name__ == "__main__":
    main()
