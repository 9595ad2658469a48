"""Scores of model outputs against expected answers, as RULER scores them: a
case-insensitive substring match per expected answer; "all" averages over the answers (each
found counts its share), "part" counts 1 if any is found. Task and headline averages."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

METRICS = ("all", "part")


def score(output: str, answers: Sequence[str], metric: str = "all") -> float:
    """The score in [0, 1] of one output."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not isinstance(output, str):
        raise TypeError(f"output must be a str, got {type(output).__name__}")
    if not answers:
        raise ValueError("answers must list at least one expected answer")
    text = output.lower()
    found = [a.lower() in text for a in answers]
    return sum(found) / len(found) if metric == "all" else float(any(found))


def task_means(rows: Iterable[Mapping[str, object]]) -> dict[tuple[str, ...], float]:
    """Mean score (in %) per (setting, policy, keep, task) over rows that carry those keys
    and a "score"."""
    sums: dict[tuple[str, ...], list[float]] = {}
    for r in rows:
        key = tuple(str(r[k]) for k in ("setting", "policy", "keep", "task"))
        sums.setdefault(key, []).append(float(r["score"]))  # type: ignore[arg-type]
    return {k: 100 * sum(v) / len(v) for k, v in sums.items()}


def headline(means: Mapping[tuple[str, ...], float], full: Mapping[str, float],
             floor: float = 50.0) -> tuple[list[str], dict[tuple[str, ...], float]]:
    """(the tasks the full cache scores at least `floor` % on, the mean over those tasks
    per (setting, policy, keep)); a small model fails some tasks whatever the cache does,
    so headline averages leave those out (and say which)."""
    kept = sorted(t for t, s in full.items() if s >= floor)
    groups: dict[tuple[str, ...], list[float]] = {}
    for (setting, policy, keep, t), s in means.items():
        if t in kept:
            groups.setdefault((setting, policy, keep), []).append(s)
    return kept, {k: sum(v) / len(v) for k, v in groups.items() if len(v) == len(kept)}
