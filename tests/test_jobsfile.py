"""The --jobs JSONL format and its resumable runner: every kind of bad line with its line
number, skip vs stop, answers that survive a kill (KeyboardInterrupt, SystemExit, SIGKILL
of a real process) and a rerun that asks each question exactly once, a truncated last line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ringmem.jobs.jobsfile import BadLine, Job, Results, parse_jobs, run_jobs

ALLOWED = {"max_new_tokens": int, "budget": (int, float), "eviction": str}
ROOT = Path(__file__).resolve().parents[1]


def _write_jobs(path: Path, lines: list[object]) -> Path:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else
                                (x if isinstance(x, str) else json.dumps(x)).encode()
                                for x in lines) + b"\n")
    return path


def _good(tmp: Path, n: int, questions: int = 3) -> list[Job]:
    """n valid jobs (every other one from a document file)."""
    lines = []
    for j in range(n):
        qs = [f"q{j}.{i}?" for i in range(questions)]
        if j % 2:
            (tmp / f"doc{j}.txt").write_text(f"document {j} é")
            lines.append({"id": f"job{j}", "document": f"doc{j}.txt", "questions": qs})
        else:
            lines.append({"text": f"inline {j}", "questions": qs})
    jobs, bad = parse_jobs(_write_jobs(tmp / "jobs.jsonl", lines), ALLOWED)
    assert bad == [] and len(jobs) == n
    return jobs


def _answer(job: Job, pending: list[int]):
    for i in pending:
        yield {"question_index": i, "answer": f"A({job.id},{i})"}


def _answers(path: Path) -> Counter:
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    return Counter((r["id"], r["question_index"]) for r in recs if "error" not in r)


def _all(jobs: list[Job]) -> Counter:
    return Counter((j.id, i) for j in jobs for i in range(len(j.questions)))


# ------------------------------------------------------------------ parsing
def test_every_kind_of_bad_line_is_reported_with_its_line_number(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("a fine document")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "adir").mkdir()
    q = ["why?"]
    lines = [
        {"id": "a", "document": "ok.txt", "questions": q, "options": {"budget": 0.5}},  # 1
        "",                                                                              # 2
        "{not json",                                                                     # 3
        "[1, 2]",                                                                        # 4
        {"text": "t", "document": "ok.txt", "questions": q},                             # 5
        {"questions": q},                                                                # 6
        {"document": "missing.txt", "questions": q},                                     # 7
        {"document": "empty.txt", "questions": q},                                       # 8
        {"document": "latin1.txt", "questions": q},                                      # 9
        {"document": "adir", "questions": q},                                            # 10
        {"text": "t", "questions": []},                                                  # 11
        {"text": "t", "questions": ["ok", ""]},                                          # 12
        {"text": "t", "questions": "why?"},                                              # 13
        {"text": "t", "questions": q, "options": {"temperature": 0.1}},                  # 14
        {"text": "t", "questions": q, "options": {"max_new_tokens": "8"}},               # 15
        {"text": "t", "questions": q, "options": {"max_new_tokens": True}},              # 16
        {"id": "a", "text": "t", "questions": q},                                        # 17
        {"id": 7, "text": "t", "questions": q},                                          # 18
        {"text": "", "questions": q},                                                    # 19
        {"text": "t", "questions": q, "extra": 1},                                       # 20
        b'{"text": "\xff", "questions": ["x"]}',                                         # 21
        "   ",                                                                           # 22
        {"text": "t", "questions": q, "options": {"max_new_tokens": 8, "budget": 3}},    # 23
    ]
    jobs, bad = parse_jobs(_write_jobs(tmp_path / "jobs.jsonl", lines), ALLOWED)
    assert [(j.line, j.id) for j in jobs] == [(1, "a"), (23, "line23")]
    assert jobs[0].text == "a fine document" and jobs[0].options == {"budget": 0.5}
    assert jobs[0].document == "ok.txt" and jobs[1].options["max_new_tokens"] == 8
    want = {3: "not valid JSON", 4: "must be a JSON object, got list",
            5: "exactly one of document or text, got both",
            6: "exactly one of document or text, got neither",
            7: "document 'missing.txt' not found", 8: "document 'empty.txt' is empty",
            9: "document 'latin1.txt' is not UTF-8 (byte 3)",
            10: "document 'adir' cannot be read", 11: "questions must be a non-empty list",
            12: "questions[1] must be a non-empty string or an object",
            13: "questions must be a non-empty list of strings, got 'why?'",
            14: "unknown option 'temperature'", 15: "options.max_new_tokens must be int, got '8'",
            16: "options.max_new_tokens must be int, got True",
            17: "id 'a' repeats the id of line 1", 18: "id must be a non-empty string, got 7",
            19: "text must be a non-empty string, got ''",
            20: "unknown field(s) ['extra']", 21: "not UTF-8"}
    assert [b.line for b in bad] == sorted(want), bad
    for b in bad:
        assert want[b.line] in b.reason, (b, want[b.line])
    assert str(bad[0]).startswith("line 3: ")
    with pytest.raises(ValueError, match="cannot be read"):
        parse_jobs(tmp_path / "nope.jsonl", ALLOWED)


def test_documents_resolve_from_the_jobs_file_folder(tmp_path, monkeypatch) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("doc")
    path = _write_jobs(tmp_path / "sub" / "jobs.jsonl",
                       [{"document": "d.txt", "questions": ["q"]},
                        {"document": str(tmp_path / "sub" / "d.txt"), "questions": ["q"]}])
    monkeypatch.chdir(tmp_path)
    jobs, bad = parse_jobs(path, ALLOWED)
    assert bad == [] and [j.text for j in jobs] == ["doc", "doc"]


# ------------------------------------------------------------------ running
def test_bad_lines_skip_or_stop(tmp_path: Path, capsys) -> None:
    jobs = _good(tmp_path, 2)
    bad = [BadLine(4, "text must be a non-empty string, got ''")]
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "old", "question_index": 0}) + "\n")
    with pytest.raises(ValueError, match="line 4: text must be"):
        run_jobs(jobs, Results(out), _answer, bad=bad, on_error="stop", progress=False)
    assert out.read_text() == json.dumps({"id": "old", "question_index": 0}) + "\n"
    with Results(out) as r:
        s = run_jobs(jobs, r, _answer, bad=bad, progress=False)
    assert "jobs file line 4: text must be" in capsys.readouterr().err
    assert s.answered == 6 and s.jobs_run == 2 and s.bad_lines == 1 and not s.errors
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert recs[1] == {"id": "line1", "line": 1, "question_index": 0, "question": "q0.0?",
                       "answer": "A(line1,0)"}
    with pytest.raises(ValueError, match="on_error must be one of"):
        run_jobs(jobs, Results(out), _answer, on_error="ignore")


def test_a_failing_job_is_skipped_or_stops_the_run(tmp_path: Path, capsys) -> None:
    jobs = _good(tmp_path, 3)

    def answer(job: Job, pending: list[int]):
        for i in pending:
            if job.id == "job1" and i == 1:
                raise RuntimeError("model ran out of memory")
            yield {"question_index": i, "answer": "x"}
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError, match="out of memory"):
        run_jobs(jobs, Results(out), answer, on_error="stop", progress=False)
    assert _answers(out) == Counter({("line1", 0): 1, ("line1", 1): 1, ("line1", 2): 1,
                                     ("job1", 0): 1})  # written before the error: kept
    s = run_jobs(jobs, Results(out), answer, progress=False)
    assert s.errors == [("job1", "RuntimeError: model ran out of memory")]
    assert s.jobs_complete == 1 and s.jobs_run == 2 and s.answered == 3
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert {"id": "job1", "line": 2, "error": "RuntimeError: model ran out of memory"} in recs
    assert "job 'job1' (line 2) failed" in capsys.readouterr().err
    s = run_jobs(jobs, Results(out), _answer, progress=False)  # the rerun finishes job1
    assert s.answered == 2 and _answers(out) == _all(jobs)
    # a fatal type (a lost peer) stops the run even under "skip"
    out3 = tmp_path / "out3.jsonl"
    with pytest.raises(RuntimeError, match="out of memory"):
        run_jobs(jobs, Results(out3), answer, progress=False, fatal=(RuntimeError,))
    assert ("job1", 0) in _answers(out3) and ("line3", 0) not in _answers(out3)

    def wrong(job: Job, pending: list[int]):
        yield {"question_index": pending[0]}
        yield {"question_index": pending[0]}  # twice
    (tmp_path / "x").mkdir()
    jobs2 = _good(tmp_path / "x", 2)
    s = run_jobs(jobs2, Results(tmp_path / "o2.jsonl"), wrong, progress=False)
    assert len(s.errors) == 2 and "question_index is one of the pending" in s.errors[0][1]


def test_progress_bar_counts_pending_questions(tmp_path: Path, capsys) -> None:
    pytest.importorskip("tqdm")
    jobs = _good(tmp_path, 3)
    out = tmp_path / "out.jsonl"
    with Results(out) as r:
        r.write({"id": "line1", "question_index": 0, "answer": "x"})
    run_jobs(jobs, Results(out), _answer, progress=True)
    err = capsys.readouterr().err
    assert "documents 3/3" in err and "8/8" in err, err


def test_non_writing_ranks_write_nothing(tmp_path: Path) -> None:
    jobs = _good(tmp_path, 2)
    out = tmp_path / "out.jsonl"
    s = run_jobs(jobs, Results(out, readonly=True), _answer, write=False, progress=False)
    assert s.answered == 6 and not out.exists()
    with pytest.raises(ValueError, match="read-only"):
        Results(out, readonly=True).write({"id": "a", "question_index": 0})


# ------------------------------------------------------------------ kill and resume
@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_interrupted_run_resumes_without_losing_or_repeating(tmp_path, stop) -> None:
    jobs = _good(tmp_path, 4)
    out, k, asked = tmp_path / "out.jsonl", 5, Counter()

    def dying(job: Job, pending: list[int]):
        for i in pending:
            if sum(asked.values()) == k:
                raise stop()
            asked[(job.id, i)] += 1
            yield {"question_index": i, "answer": "x"}
    with pytest.raises(stop):
        run_jobs(jobs, Results(out), dying, progress=False)  # even with on_error="skip"
    assert sum(_answers(out).values()) == k

    def counting(job: Job, pending: list[int]):
        for i in pending:
            asked[(job.id, i)] += 1
            yield {"question_index": i, "answer": "x"}
    run_jobs(jobs, Results(out), counting, progress=False)
    assert asked == _all(jobs) and _answers(out) == _all(jobs)  # each asked and written once


_WORKER = """
import os, signal, sys
from ringmem.jobs.jobsfile import Results, parse_jobs, run_jobs
jobs, _ = parse_jobs(sys.argv[1], {})
n = [0]
def answer(job, pending):
    for i in pending:
        if n[0] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        n[0] += 1
        yield {"question_index": i, "answer": "x"}
run_jobs(jobs, Results(sys.argv[2]), answer, progress=False)
"""


def test_sigkilled_process_then_resume_answers_each_question_once(tmp_path: Path) -> None:
    jobs = _good(tmp_path, 4)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _WORKER, str(tmp_path / "jobs.jsonl"), str(out),
                        "7"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert sum(_answers(out).values()) == 7  # every answer written before the kill
    with open(out, "ab") as f:  # and a write cut short by it
        f.write(b'{"id": "job3", "question_in')
    r = subprocess.run([sys.executable, "-c", _WORKER, str(tmp_path / "jobs.jsonl"), str(out),
                        "-1"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _answers(out) == _all(jobs)
    assert all(json.loads(x) for x in out.read_text().splitlines())  # no partial line left


def test_truncated_last_line_is_dropped_and_complete_lines_kept(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    good = [json.dumps({"id": "a", "question_index": i, "answer": "x"}) for i in range(2)]
    out.write_text("\n".join(good) + '\n{"id": "a", "question_index": 2, "ans')
    r = Results(out, readonly=True)  # a reading rank: the file is left as it is
    assert r.done("a", 1) and not r.done("a", 2)
    assert out.read_text().endswith('"ans')
    r = Results(out)
    assert out.read_text() == "\n".join(good) + "\n" and not r.done("a", 2)
    r.write({"id": "a", "question_index": 2, "answer": "y"})
    assert [json.loads(x)["question_index"] for x in out.read_text().splitlines()] == [0, 1, 2]
    # killed between a whole record and its newline: the record counts, a newline is added
    out.write_text(good[0] + "\n" + good[1])
    r = Results(out)
    assert r.done("a", 1) and out.read_text() == "\n".join(good) + "\n"
    r.write({"id": "a", "question_index": 2})
    assert len(out.read_text().splitlines()) == 3
    r.close()
