"""The `--jobs FILE.jsonl` format and a resumable runner that writes answers as they come.

One JSON object per line (blank lines are skipped; JSONL has no comments):

    {"id": "doc-a", "document": "docs/a.txt", "questions": ["Who?", "When?"]}
    {"text": "an inline document ...", "questions": ["What?"], "options": {"budget": 512}}

`id` (optional, default "line<N>") names the job in the output; exactly one of `document`
(a UTF-8 file, relative paths from the jobs file's folder) or `text`; `questions`: a
non-empty list of non-empty strings; `options`: only keys the caller allows, of their types.

    jobs, bad = parse_jobs("jobs.jsonl", {"max_new_tokens": int, "budget": (int, float)})
    results = Results("answers.jsonl", readonly=rank != 0)   # what an earlier run answered
    run_jobs(jobs, results, answer, bad=bad, write=rank == 0, progress=rank == 0)

Every answer is one output line, appended and fsynced as soon as `answer` yields it, so a
killed run loses nothing it wrote; a rerun with the same output file asks only the
questions still unanswered (a line cut short by the kill is dropped).
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIELDS = ("id", "document", "text", "questions", "options")
ON_ERROR = ("skip", "stop")


@dataclass(frozen=True)
class Job:
    """One valid line: the document's text (read when parsed) and its questions."""
    line: int
    id: str
    text: str
    questions: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    document: str | None = None
    """The `document` path as written in the line (None: inline `text`)."""
    prefixes: tuple[str | None, ...] = ()
    """Each question's own answer prefix (None: the run's), when the line gives some."""


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def _short(v: object, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[:n - 3] + "..."


def _type_ok(value: object, want: type | tuple[type, ...]) -> bool:
    """isinstance, except that a bool is no int and an int is a float (JSON's 1 vs 1.0)."""
    types = want if isinstance(want, tuple) else (want,)
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types) or (float in types and isinstance(value, int))


def _read_document(raw: object, base: Path) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"document must be a non-empty path string, got {_short(raw)}")
    path = Path(raw).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"document {raw!r} not found ({path})") from None
    except OSError as e:
        raise ValueError(f"document {raw!r} cannot be read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"document {raw!r} is not UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"document {raw!r} is empty")
    return text


def _job(n: int, obj: object, allowed: Mapping[str, Any], base: Path) -> Job:
    """The Job of line `n`, or ValueError naming the field and the value."""
    if not isinstance(obj, dict):
        raise ValueError(f"must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} (allowed: {list(FIELDS)})")
    jid = obj.get("id", f"line{n}")
    if not isinstance(jid, str) or not jid.strip():
        raise ValueError(f"id must be a non-empty string, got {_short(jid)}")
    if ("document" in obj) == ("text" in obj):
        raise ValueError("give exactly one of document or text, got "
                         + ("both" if "document" in obj else "neither"))
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text must be a non-empty string, got {_short(text)}")
    else:
        text = _read_document(obj["document"], base)
    qs = obj.get("questions")
    if not isinstance(qs, list) or not qs:
        raise ValueError(f"questions must be a non-empty list of strings, got {_short(qs)}")
    texts, prefixes = [], []
    for i, q in enumerate(qs):  # a string, or {"question": ..., "answer_prefix": ...}
        one = q.get("question") if isinstance(q, dict) else q
        pre = q.get("answer_prefix") if isinstance(q, dict) else None
        if (not isinstance(one, str) or not one.strip() or not isinstance(pre, (str, type(None)))
                or (isinstance(q, dict) and set(q) - {"question", "answer_prefix"})):
            raise ValueError(f"questions[{i}] must be a non-empty string or an object "
                             f"{{\"question\": str, \"answer_prefix\": str}}, got {_short(q)}")
        texts.append(one)
        prefixes.append(pre)
    opts = obj.get("options", {})
    if not isinstance(opts, dict):
        raise ValueError(f"options must be an object, got {_short(opts)}")
    for k, v in opts.items():
        if k not in allowed:
            raise ValueError(f"options: unknown option {k!r} (allowed: {sorted(allowed)})")
        if not _type_ok(v, allowed[k]):
            want = allowed[k]
            names = "/".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise ValueError(f"options.{k} must be {names}, got {_short(v)}")
    return Job(line=n, id=jid, text=text, questions=tuple(texts), options=dict(opts),
               document=obj.get("document"),
               prefixes=tuple(prefixes) if any(p is not None for p in prefixes) else ())


def parse_jobs(path: str | Path, allowed: Mapping[str, type | tuple[type, ...]]
               ) -> tuple[list[Job], list[BadLine]]:
    """The valid jobs of a JSONL jobs file and its bad lines (1-based line numbers, the
    reason naming the field and value). Documents are read now. A repeated id is a bad
    line (the first keeps it). Raises ValueError only when the file itself can't be read."""
    path = Path(path)
    if not isinstance(allowed, Mapping):
        raise TypeError(f"allowed must map option names to types, got {type(allowed).__name__}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"jobs file {path} cannot be read ({e.strerror or e})") from None
    jobs: list[Job] = []
    bad: list[BadLine] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(BadLine(n, f"not UTF-8 (byte {e.start})"))
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(BadLine(n, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        try:
            job = _job(n, obj, allowed, path.parent)
        except ValueError as e:
            bad.append(BadLine(n, str(e)))
            continue
        if job.id in seen:
            bad.append(BadLine(n, f"id {job.id!r} repeats the id of line {seen[job.id]}"))
            continue
        seen[job.id] = n
        jobs.append(job)
    return jobs, bad


class Results:
    """The output JSONL file: what is answered already (resume) and an appender that
    fsyncs every line. A last line cut short by a kill (no newline, not JSON) is dropped:
    the file is truncated back to its last complete line (unless `readonly`, for ranks
    that only read). Error lines ({"id", "error"}) do not count as answers (retried)."""

    def __init__(self, out_path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(out_path)
        self.readonly = readonly
        self._done: set[tuple[str, int]] = set()
        self._file = None
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        end = data.rfind(b"\n") + 1  # bytes up to the last complete line
        tail, lines = data[end:], data[:end].split(b"\n")[:-1]
        if tail.strip():
            try:  # killed between the JSON and its newline: the line is whole
                json.loads(tail)
                lines.append(tail)
                if not readonly:
                    self._append(b"\n")
            except ValueError:
                if not readonly:  # drop the partial line, keep every complete one
                    os.truncate(self.path, end)
        for raw in lines:
            try:
                self._note(json.loads(raw))
            except ValueError:
                continue  # a damaged line is no answer: its question is asked again

    def _note(self, rec: object) -> None:
        if isinstance(rec, dict) and "error" not in rec and isinstance(rec.get("id"), str) \
                and isinstance(rec.get("question_index"), int):
            self._done.add((rec["id"], rec["question_index"]))

    def _append(self, data: bytes) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def done(self, job_id: str, qi: int) -> bool:
        return (job_id, qi) in self._done

    def pending(self, job: Job) -> list[int]:
        """Indices of `job`'s questions not answered yet."""
        return [i for i in range(len(job.questions)) if not self.done(job.id, i)]

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record as a JSON line, flushed and fsynced before returning."""
        if self.readonly:
            raise ValueError(f"Results({str(self.path)!r}) is read-only on this rank")
        line = json.dumps(dict(record), ensure_ascii=False) + "\n"
        self._append(line.encode("utf-8"))
        self._note(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Results:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Summary:
    """What `run_jobs` did: jobs asked, jobs already complete, answers written, errors."""
    jobs_run: int = 0
    jobs_complete: int = 0
    answered: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    bad_lines: int = 0


Answer = Callable[[Job, list[int]], Iterable[Mapping[str, Any]]]


def _bar(total: int, jobs: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: no bar then
        return None
    return tqdm(total=total, unit="question", desc=f"documents 0/{jobs}", file=sys.stderr)


def run_jobs(jobs: Sequence[Job], results: Results, answer: Answer, *,
             bad: Sequence[BadLine] = (), on_error: str = "skip", progress: bool = True,
             write: bool = True, fatal: tuple[type[BaseException], ...] = ()) -> Summary:
    """Ask every job its pending questions, writing each answer as soon as it comes.

    answer(job, pending) yields one record (a dict with "question_index", one of `pending`)
    per question as it finishes; the runner adds "id", "line" and "question" and appends
    it to `results` (when `write`: rank 0; every rank runs the same loop). `bad` lines
    are printed to stderr (by the writing rank) and skipped, or with on_error="stop" raise
    ValueError before any question is asked. An exception from `answer` (or a record it
    gets wrong): "skip" writes an error line {"id", "line", "error"} and goes on (the job
    is asked again on a rerun), "stop" re-raises. KeyboardInterrupt / SystemExit always
    propagate, and so do the `fatal` types (a lost peer: the ranks cannot go on together);
    everything written so far stays. A progress bar over the pending questions (tqdm, when
    installed) when `progress`.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if bad and on_error == "stop":
        raise ValueError(f"{len(bad)} bad line(s) in the jobs file:\n"
                         + "\n".join(f"  {b}" for b in bad))
    if write:
        for b in bad:
            print(f"jobs file {b}; skipped", file=sys.stderr)
    todo = [(job, results.pending(job)) for job in jobs]
    out = Summary(jobs_complete=sum(1 for _, p in todo if not p), bad_lines=len(bad))
    bar = _bar(sum(len(p) for _, p in todo), len(jobs), progress)
    finished = out.jobs_complete
    try:
        for job, pending in todo:
            if not pending:
                continue
            out.jobs_run += 1
            left = set(pending)
            try:
                for rec in answer(job, list(pending)):
                    qi = rec.get("question_index") if isinstance(rec, Mapping) else None
                    if isinstance(qi, bool) or qi not in left:
                        raise ValueError(f"answer yielded {_short(rec, 120)} for job "
                                         f"{job.id!r}: each record must be a dict whose "
                                         f"question_index is one of the pending "
                                         f"{sorted(left)}")
                    left.discard(qi)
                    if write:
                        results.write({"id": job.id, "line": job.line, "question_index": qi,
                                       "question": job.questions[qi],
                                       **{k: v for k, v in rec.items()
                                          if k not in ("id", "line", "question")}})
                    out.answered += 1
                    if bar is not None:
                        bar.update(1)
                if left:
                    raise ValueError(f"answer yielded no record for question(s) "
                                     f"{sorted(left)} of job {job.id!r}")
            except Exception as e:  # noqa: BLE001 (the caller chose skip or stop)
                if on_error == "stop" or isinstance(e, fatal):
                    raise
                msg = f"{type(e).__name__}: {e}"
                out.errors.append((job.id, msg))
                if write:
                    results.write({"id": job.id, "line": job.line, "error": msg})
                    print(f"job {job.id!r} (line {job.line}) failed: {msg}", file=sys.stderr)
                if bar is not None:
                    bar.update(len(left))
            finished += 1
            if bar is not None:
                bar.set_description(f"documents {finished}/{len(jobs)}")
    finally:
        if bar is not None:
            bar.close()
    return out
