"""Long-context tasks in the manner of RULER, generated locally from fixed seeds.

Nothing is downloaded: the haystack is the King James Bible (`demo.haystack`) or a
repeated filler passage, and needles, words and variables come from a seeded
`random.Random`. A seed gives the same samples on every machine and every rank.

Each `Sample` is a context (the document: instruction + haystack with what is planted in
it) and one or more `Query`s (a question, the answer prefix a base model completes, the
expected answers and how they are scored), so the question-agnostic setting can compress
one document and then ask all of its queries. Tasks (`TASKS`):

* needle retrieval: `niah_single` (one needle), `niah_multikey` (several keys, one asked),
  `niah_multivalue` (one key, several values, all asked), `niah_multiquery` (several keys,
  each asked: one query each); needles of words, numbers or UUIDs (`needle=`), in KJV
  text or filler (`haystack=`);
* `vt` variable tracking: chains of assignments VAR A = 12345, VAR B = VAR A, ... hidden
  in filler; every variable holding the value is asked;
* `cwe` common words: a numbered list where 10 words recur more often than the rest;
* `fwe` frequent words: coded words drawn from a Zipf law; the three most frequent;
* `qa` question answering over KJV passages (8 verses each) with distractors: a verse's
  last word is asked (cloze) of one passage among many.

Scoring (`scoring.py`): "all" (the fraction of expected answers found in the output) or
"part" (1 if any is), case-insensitive substring match, as RULER scores.
"""
from __future__ import annotations

import random
import re
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again.")
NEEDLES = ("words", "numbers", "uuids")
HAYSTACKS = ("kjv", "filler")


@dataclass(frozen=True)
class Query:
    """One question about a sample's context, what a base model's answer continues, and the
    expected answers (scored by `metric`)."""
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    metric: str = "all"  # "all": every answer must appear; "part": any one


@dataclass(frozen=True)
class Sample:
    """A generated context (instruction + haystack + what was planted) and its queries."""
    task: str
    index: int
    context: str
    queries: tuple[Query, ...]
    planted: tuple[str, ...] = ()  # the exact sentences planted in the context


def _words(rng: random.Random, n: int) -> list[str]:
    """n distinct lowercase pseudo-words (consonant-vowel syllables: no dictionary needed)."""
    out: set[str] = set()
    cons, vows = "bcdfghjklmnprstvz", "aeiou"
    while len(out) < n:
        out.add("".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.randint(2, 4))))
    words = sorted(out)  # not the set's order: string hashes differ between processes
    rng.shuffle(words)
    return words


def _value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return _words(rng, 1)[0]


def _units(haystack: str, offset: int) -> Callable[[int], list[str]]:
    """The first n sentences of the haystack (KJV verses from `offset`, or filler)."""
    if haystack == "filler":
        return lambda n: [FILLER] * n
    from ..demo.haystack import kjv_verses
    verses = kjv_verses()
    return lambda n: [verses[(offset + i) % len(verses)] for i in range(n)]


def _fit(build: Callable[[int], str], count: Callable[[str], int], tokens: int) -> str:
    """build(n) with the largest n whose token count is at most `tokens` (n >= 1)."""
    lo, hi = 0, 1
    while count(build(hi)) <= tokens:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(build(mid)) <= tokens else (lo, mid)
    return build(max(lo, 1))


def _plant(body: list[str], needles: list[str], rng: random.Random) -> str:
    """The body's sentences with each needle inserted at a random depth (in order)."""
    at = sorted(rng.randint(0, len(body)) for _ in needles)
    out = list(body)
    for i, (pos, needle) in enumerate(zip(at, needles)):
        out.insert(pos + i, needle)
    return " ".join(out)


def _niah(kind: str, keys: int, values: int, asked: int, needle: str,
          haystack: str) -> Callable[..., Sample]:
    def make(rng: random.Random, index: int, count: Callable[[str], int], tokens: int,
             offset: int) -> Sample:
        what = {"numbers": "numbers", "uuids": "uuids", "words": "words"}[needle]
        names = _words(rng, keys)
        vals = [[_value(rng, needle) for _ in range(values)] for _ in names]
        lines = [f"One of the special magic {what} for {k} is: {v}."
                 for k, vs in zip(names, vals) for v in vs]
        rng.shuffle(lines)
        head = (f"Some special magic {what} are hidden within the following text. "
                f"Remember them: I will ask about them afterwards.\n")
        units = _units(haystack, offset)
        seed = rng.random()  # the needles' depths, the same for every candidate length
        context = _fit(lambda n: head + _plant(units(n), lines, random.Random(seed)),
                       count, tokens)
        qs = tuple(Query(f"What are all the special magic {what} for {k} mentioned in the "
                         f"text?", f"The special magic {what} for {k} mentioned in the text "
                         f"are", tuple(v)) for k, v in list(zip(names, vals))[:asked])
        return Sample(kind, index, context, qs, tuple(lines))
    return make


def _vt(rng: random.Random, index: int, count: Callable[[str], int], tokens: int,
        offset: int, chains: int = 1, hops: int = 4) -> Sample:
    names = [w.upper()[:5] for w in _words(rng, chains * (hops + 1))]
    value = str(rng.randint(10000, 99999))
    lines, chain = [], names[:hops + 1]
    lines.append(f"VAR {chain[0]} = {value}.")
    lines += [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
    for c in range(1, chains):  # decoy chains hold other values
        other = names[c * (hops + 1):(c + 1) * (hops + 1)]
        lines.append(f"VAR {other[0]} = {rng.randint(10000, 99999)}.")
        lines += [f"VAR {b} = VAR {a}." for a, b in zip(other, other[1:])]
    seed = rng.random()

    def build(n: int) -> str:
        r = random.Random(seed)
        body = [FILLER] * n
        at = sorted(r.randint(0, n) for _ in lines)  # in order: a chain reads forward
        out = list(body)
        for i, (pos, line) in enumerate(zip(at, lines)):
            out.insert(pos + i, line)
        return ("Memorize and track the chains of variable assignment hidden in the "
                "following text.\n\n" + " ".join(out))
    context = _fit(build, count, tokens)
    q = Query(f"Find all variables that are assigned the value {value} in the text above.",
              f"Answer: According to the chains of variable assignment in the text above, "
              f"{hops + 1} variables are assigned the value {value}, they are:", tuple(chain))
    return Sample("vt", index, context, (q,), tuple(lines))


def _cwe(rng: random.Random, index: int, count: Callable[[str], int], tokens: int,
         offset: int, common: int = 10) -> Sample:
    words = _words(rng, 2000)
    top, rest = words[:common], words[common:]
    seed = rng.random()

    def build(n: int) -> str:
        r = random.Random(seed)
        items = [w for w in top for _ in range(max(3, n // 60 + 3))]
        items += r.sample(rest, min(len(rest), n))
        r.shuffle(items)
        return ("Below is a numbered list of words. Some of them appear more often than "
                "others: memorize the ones that appear most often.\n"
                + " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)))
    context = _fit(build, count, tokens)
    q = Query(f"What are the {common} most common words in the list above?",
              f"Answer: The top {common} words that appear most often in the list are:",
              tuple(top))
    return Sample("cwe", index, context, (q,))


def _fwe(rng: random.Random, index: int, count: Callable[[str], int], tokens: int,
         offset: int, alpha: float = 2.0) -> Sample:
    vocab = _words(rng, 800)
    seed = rng.random()

    def draw(n: int) -> list[str]:
        r = random.Random(seed)
        weights = [1 / (i + 1) ** alpha for i in range(len(vocab))]
        return r.choices(vocab, weights=weights, k=n)

    def build(n: int) -> str:
        return ("Read the following coded text and track how often each coded word "
                "appears. Ignore the dots.\n" + " .... ".join(draw(n)))
    context = _fit(build, count, tokens)
    n = context.count(" .... ") + 1
    top = tuple(w for w, _ in Counter(draw(n)).most_common(3))
    q = Query("What are the three most frequently appearing coded words in the text above?",
              "Answer: According to the coded text above, the three most frequently "
              "appearing words are:", top)
    return Sample("fwe", index, context, (q,))


def _qa(rng: random.Random, index: int, count: Callable[[str], int], tokens: int,
        offset: int, verses: int = 8) -> Sample:
    from ..demo.haystack import kjv_verses
    kjv = kjv_verses()
    gold = rng.randrange(len(kjv) - verses)
    far = [i for i in range(0, len(kjv) - verses, verses) if abs(i - gold) > 2 * verses]
    starts = rng.sample(far, 400)  # distractor passages, none overlapping the gold one

    def passage(i: int) -> str:
        return " ".join(kjv[i:i + verses])
    text = kjv[gold:gold + verses]
    long = [v for v in text if len(v.split()) >= 8 and re.search(r"[A-Za-z]{4,}\W*$", v)]
    verse = rng.choice(long or list(text))
    answer = re.findall(r"[A-Za-z]+", verse)[-1]
    cloze = verse[:verse.rfind(answer)].rstrip()
    seed = rng.random()

    def build(n: int) -> str:
        docs = [passage(i) for i in starts[:n - 1]]
        docs.insert(random.Random(seed).randint(0, len(docs)), passage(gold))
        return ("Answer the question from the given documents. Only give the answer.\n\n"
                + "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs)))
    context = _fit(build, count, tokens)
    q = Query(f"Which word ends this sentence of the documents: \"{cloze} ...\"?",
              "Answer:", (answer,), "part")
    return Sample("qa", index, context, (q,), (verse,))


def task(name: str, *, needle: str = "numbers", haystack: str = "kjv") -> Callable[..., Sample]:
    """The generator of task `name` (see the module doc)."""
    if needle not in NEEDLES:
        raise ValueError(f"needle must be one of {NEEDLES}, got {needle!r}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")
    makers = {"niah_single": _niah("niah_single", 1, 1, 1, needle, haystack),
              "niah_multikey": _niah("niah_multikey", 4, 1, 1, needle, haystack),
              "niah_multivalue": _niah("niah_multivalue", 1, 4, 1, needle, haystack),
              "niah_multiquery": _niah("niah_multiquery", 4, 1, 4, needle, haystack),
              "vt": _vt, "cwe": _cwe, "fwe": _fwe, "qa": _qa}
    if name not in makers:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    return makers[name]


TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe",
         "fwe", "qa")


def generate(name: str, tokenizer: Any, *, tokens: int, samples: int, seed: int = 0,
             needle: str = "numbers", haystack: str = "kjv") -> list[Sample]:
    """`samples` samples of task `name`, each context about `tokens` tokens long (at most;
    the queries come on top). The same arguments give the same samples."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 64:
        raise ValueError(f"tokens must be an int >= 64, got {tokens!r}")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    make = task(name, needle=needle, haystack=haystack)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    out = []
    for i in range(samples):
        rng = random.Random(f"{name}/{needle}/{haystack}/{seed}/{i}")
        out.append(make(rng, i, count, tokens, rng.randrange(30000)))
    return out
