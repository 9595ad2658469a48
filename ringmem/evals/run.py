"""`ringmem eval`: RULER-style tasks (`tasks.py`) through `ringmem infer --jobs`, scored.

    ringmem eval --model smollm2-135m --tasks niah_single vt --tokens 4096 --samples 8 \\
        --policies snapkv keynorm --keep 0.1 0.25 0.5 --settings aware agnostic --out DIR

1. Jobs: every sample (generated with the model's tokenizer, from fixed seeds) becomes
   one job with the full cache, then one per policy x keep x setting:
   * "aware" (question-aware, `compress="question"`): each question is read, then its own
     copy of the document compressed (SnapKV's observation window sees the question);
   * "agnostic" (question-agnostic, `compress="document"`, `streaming=False`): the
     document is compressed once it is prefilled, before any question (as kvpress's
     pipeline does), and every question reads that one copy;
   * "streaming" (question-agnostic, `streaming=True`): compressed after every prefill
     chunk, so the cache never holds more than the budget plus a chunk (kvzip, which
     scores by repeating the whole document, runs in "agnostic" only).
   `keep` is the share of the document each (layer, KV head) keeps (`budget`). A policy
   "NAME@ALLOCATION" also sets `allocation` (e.g. "snapkv@adaptive", "kvzip@global").
2. `ringmem infer --jobs DIR/jobs.jsonl --output DIR/answers.jsonl`: sharded over the
   ranks, a progress bar, resumable (answers already in the output are not asked again).
3. Scores: every answer scored as RULER scores (`scoring.score`) into DIR/scores.json,
   and DIR/report.md: mean accuracy per task x setting x policy x keep, and headline
   averages over the tasks the full cache scores >= 50% on (named), with DIR/accuracy.png
   (accuracy against keep, one panel per task) when matplotlib is installed.
4. kvpress beside it (`benchmarks/eval_kvpress.py`, its own environment): its answers to
   the same samples, DIR/answers_kvpress.jsonl, are scored into the same table (setting
   "kvpress"), and the report compares the best of each at equal keep.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .scoring import headline, score, task_means
from .tasks import HAYSTACKS, NEEDLES, TASKS, generate

SETTINGS = ("aware", "agnostic", "streaming")
ANSWER_TOKENS = {"niah_single": 24, "niah_multikey": 24, "niah_multiquery": 24,
                 "niah_multivalue": 64, "vt": 32, "cwe": 64, "fwe": 32, "qa": 16}
"""Tokens generated per answer by task (RULER's tokens_to_generate, for our shorter
answers: a chat model's preamble and the values; uuids twice a niah task's)."""


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ringmem eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--tokens", type=int, default=4096, help="context length per sample")
    p.add_argument("--samples", type=int, default=8, help="samples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--needle", default="numbers", choices=NEEDLES)
    p.add_argument("--haystack", default="kjv", choices=HAYSTACKS)
    p.add_argument("--policies", nargs="*", default=["snapkv", "keynorm"],
                   help="eviction scorers (ringmem infer --eviction)")
    p.add_argument("--keep", type=float, nargs="*", default=[0.1, 0.25, 0.5])
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--max-new-tokens", type=int, default=None, dest="max_new_tokens",
                   help="tokens per answer (default: per task, ANSWER_TOKENS)")
    p.add_argument("--nproc", type=int, default=None)
    p.add_argument("--out", required=True, help="directory for jobs, answers and report")
    p.add_argument("--report-only", action="store_true",
                   help="score DIR's answers only (samples 0..--samples-1, --settings)")
    a = p.parse_args(argv)
    for k in a.keep:
        if not 0.0 < k <= 1.0:
            raise ValueError(f"--keep values must be in (0, 1], got {k}")
    if a.samples < 1 or a.tokens < 64:
        raise ValueError(f"--samples must be >= 1 and --tokens >= 64, got {a.samples}, "
                         f"{a.tokens}")
    return a


def jobs(a: argparse.Namespace, tok: Any) -> tuple[list[dict], dict[str, list]]:
    """(the jobs file's lines, job id -> each question's [answers, metric])."""
    lines, expected = [], {}
    # kvzip scores the document by repeating it, before any question: agnostic only
    runs = [("full", "full", 1.0)] + [(s, p, k) for s in a.settings for p in a.policies
                                      for k in a.keep
                                      if s == "agnostic" or not p.startswith("kvzip")]
    for name in a.tasks:
        for smp in generate(name, tok, tokens=a.tokens, samples=a.samples, seed=a.seed,
                            needle=a.needle, haystack=a.haystack):
            for setting, policy, keep in runs:
                jid = f"{name}:{smp.index}:{setting}:{policy}:{keep}"
                opts: dict[str, Any] = {"max_new_tokens": a.max_new_tokens or
                                        ANSWER_TOKENS[name] * (1 + (a.needle == "uuids"
                                                                    and "niah" in name))}
                if policy != "full":
                    scorer, _, alloc = policy.partition("@")
                    opts |= {"eviction": scorer, "budget": keep,
                             "compress": "question" if setting == "aware" else "document"}
                    if setting != "aware":
                        opts["streaming"] = setting == "streaming"
                    if alloc:
                        opts["allocation"] = alloc
                lines.append({"id": jid, "text": smp.context, "options": opts,
                              "questions": [{"question": q.question,
                                             "answer_prefix": q.answer_prefix}
                                            for q in smp.queries]})
                expected[jid] = [[list(q.answers), q.metric] for q in smp.queries]
    return lines, expected


def by_sample(expected: dict[str, list]) -> dict[tuple[str, ...], list]:
    """Expected answers by (task, sample index): a job id's first two fields."""
    return {tuple(j.split(":")[:2]): want for j, want in expected.items()}


def merge_expected(old: dict[str, list], new: dict[str, list], where: Path) -> dict[str, list]:
    """An earlier run's expected answers with this run's; answers are scored by (task,
    sample), so a sample that differs from the one DIR already holds is refused."""
    held = by_sample(old)
    for (task, index), want in by_sample(new).items():
        if held.get((task, index), want) != want:
            raise SystemExit(f"{where} holds a different {task} sample {index} (another "
                             f"--tokens, --seed, --needle or --haystack, or another ringmem "
                             f"version's generator): use a fresh --out")
    return old | new


def scores(answers: list[dict], expected: dict[str, list]) -> list[dict]:
    """One row per answered question: task, sample, setting, policy, keep, output, score."""
    rows = []
    wants = by_sample(expected)
    for r in answers:
        parts = str(r.get("id")).split(":")
        want = wants.get(tuple(parts[:2])) if len(parts) == 5 else None
        if want is None or "error" in r:  # another run's line, or a job that failed
            continue
        task, index, setting, policy, keep = parts
        refs, metric = want[r["question_index"]]
        rows.append({"task": task, "sample": int(index), "setting": setting,
                     "policy": policy, "keep": float(keep), "output": r["answer"],
                     "answers": refs, "score": score(r["answer"], refs, metric)})
    return rows


def report(rows: list[dict], out: Path, title: str) -> str:
    """DIR/report.md (and accuracy.png): per-task means and headline averages."""
    means = task_means(rows)
    full = {t: s for (setting, _, _, t), s in means.items() if setting == "full"}
    kept, heads = headline(means, full)
    tasks = sorted({t for *_, t in means})
    runs = sorted({k[:3] for k in means}, key=lambda k: (k[0] != "full", k))
    lines = [f"# {title}", "", "Accuracy (%) per task; RULER scoring (string match of the "
             "expected answers). `keep`: share of the document each (layer, KV head) keeps.",
             "", "| setting | policy | keep | " + " | ".join(tasks) + " | headline |",
             "|---" * (len(tasks) + 4) + "|"]
    for run in runs:
        cells = [f"{means[(*run, t)]:.1f}" if (*run, t) in means else "-" for t in tasks]
        h = heads.get(run)
        lines.append(f"| {' | '.join(run)} | {' | '.join(cells)} | "
                     f"{'-' if h is None else f'{h:.1f}'} |")
    lines += ["", f"Headline: the mean over the tasks the full cache scores >= 50% on: "
              f"{', '.join(kept) or 'none'}."] + _versus(heads, full, kept)
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    _plot(means, tasks, out / "accuracy.png")
    return text


def _versus(heads: dict, full: dict, kept: list[str]) -> list[str]:
    """The targets: the best question-agnostic policy against the full cache, and against
    the best kvpress press, at each keep (headline means)."""
    if not kept or not any(k[0] in ("agnostic", "kvpress") for k in heads):
        return []
    base = sum(full[t] for t in kept) / len(kept)
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for (setting, policy, keep), h in heads.items():
        if setting in ("agnostic", "kvpress"):
            cur = best.get((setting, keep))
            if cur is None or h > cur[0]:
                best[(setting, keep)] = (h, policy)
    lines = ["", "| keep | full | best ringmem agnostic | best kvpress | ringmem - kvpress |",
             "|---|---|---|---|---|"]
    for keep in sorted({k for _, k in best}, key=float):
        r, v = best.get(("agnostic", keep)), best.get(("kvpress", keep))
        cells = [f"{x[0]:.1f} ({x[1]})" if x else "-" for x in (r, v)]
        diff = f"{r[0] - v[0]:+.1f}" if r and v else "-"
        lines.append(f"| {keep} | {base:.1f} | {cells[0]} | {cells[1]} | {diff} |")
    return lines


def _plot(means: dict, tasks: list[str], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the report's table stands alone
        return
    # the tasks with compressed runs (the others hold a full-cache line alone)
    tasks = [t for t in tasks if any(k[0] != "full" and k[3] == t for k in means)] or tasks
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.2), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for (setting, policy) in sorted({k[:2] for k in means if k[0] != "full"}):
            pts = sorted((float(k[2]), s) for k, s in means.items()
                         if k[:2] == (setting, policy) and k[3] == t)
            # kvpress dashed with hollow markers: equal results stay visible on ringmem's
            ax.plot([p[0] for p in pts], [p[1] for p in pts],
                    "s--" if setting == "kvpress" else "o-",
                    mfc="none" if setting == "kvpress" else None,
                    ms=8 if setting == "kvpress" else 4, label=f"{policy} ({setting})")
        full = [s for k, s in means.items() if k[0] == "full" and k[3] == t]
        if full:
            ax.axhline(full[0], color="k", ls="--", label="full cache")
        ax.set(title=t, xlabel="keep", ylim=(-5, 105))
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        from ..demo import models
        tok = models.load_tokenizer(a.model)
        lines, expected = jobs(a, tok)
        (out / "jobs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        old = out / "expected.json"  # an earlier run's samples in DIR are scored too
        expected = merge_expected(json.loads(old.read_text()) if old.exists() else {},
                                  expected, old)
        old.write_text(json.dumps(expected))
        cmd = [sys.executable, "-m", "ringmem.cli", "infer", "--model", a.model,
               "--jobs", str(out / "jobs.jsonl"), "--output", str(out / "answers.jsonl"),
               "--max-context", str(a.tokens + 1024), "--haystack-tokens", "128"]
        if a.nproc is not None:
            cmd[4:4] = ["--nproc", str(a.nproc)]
        rc = subprocess.run(cmd).returncode
        if rc != 0:  # what was answered is kept: the same command resumes
            raise ValueError(f"ringmem infer stopped (exit {rc}); the answers so far are in "
                             f"{out / 'answers.jsonl'}: run the same command to resume")
    expected = json.loads((out / "expected.json").read_text())
    answers = [json.loads(x) for name in ("answers.jsonl", "answers_kvpress.jsonl")
               if (out / name).exists()
               for x in (out / name).read_text().splitlines() if x.strip()]
    keep = ("full", "kvpress", *a.settings)  # the report covers the settings asked for
    rows = [r for r in scores(answers, expected)
            if r["sample"] < a.samples and r["setting"] in keep]
    (out / "scores.json").write_text(json.dumps(rows, indent=1))
    print(report(rows, out, f"ringmem eval: {a.model}, {a.tokens} tokens, "
                            f"{a.samples} samples per task"))


if __name__ == "__main__":
    main()
