"""Training data: documents tokenized and packed into rows of whole documents.

Documents come in a reproducibly shuffled order and fill rows of exactly `seq_len` tokens;
a document that does not fit in what is left of a row is cut there and goes on as its own
document in the next row (no token is dropped, no attention crosses a cut). Each row keeps
its `cu_seqlens`; a token's label is the next token of its own document (-100 at a
document's last token). The row of every (step, micro-step, data-parallel rank) is a pure
function of those numbers, so a resumed run reads exactly what it would have.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

IGNORE = -100


def read_texts(files: list[str]) -> list[str]:
    """Documents of text files (blank-line-separated blocks) and JSONL files ("text")."""
    texts: list[str] = []
    for f in files:
        path = Path(f)
        if path.suffix == ".jsonl":
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise ValueError(f"{f}:{i + 1}: each JSONL line needs a \"text\" string")
                    texts.append(row["text"])
        else:
            texts += [b.strip() for b in path.read_text(encoding="utf-8").split("\n\n")
                      if b.strip()]
    if not texts:
        raise ValueError(f"no documents in {files}")
    return texts


def documents(data: str, files: list[str], tokenizer: Any, seed: int,
              limit: int = 0) -> list[list[int]]:
    """Token ids of every document (EOS appended), in a shuffled order fixed by `seed`."""
    if data == "kjv":
        from ..demo.haystack import kjv_chapters
        texts = list(kjv_chapters())
    else:
        texts = read_texts(files)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    if limit:
        order = order[:limit]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = tokenizer([texts[i] for i in order], add_special_tokens=False)["input_ids"]
    return [list(t) + eos for t in ids if t]


@dataclass(frozen=True)
class Row:
    tokens: tuple[int, ...]
    cu_seqlens: tuple[int, ...]


def pack(docs: list[list[int]], seq_len: int) -> list[Row]:
    """Rows of exactly `seq_len` tokens (a last partial row is dropped)."""
    rows: list[Row] = []
    tokens: list[int] = []
    cu = [0]
    for doc in docs:
        while doc:
            take = doc[: seq_len - len(tokens)]
            tokens += take
            cu.append(len(tokens))
            doc = doc[len(take):]
            if len(tokens) == seq_len:
                rows.append(Row(tuple(tokens), tuple(cu)))
                tokens, cu = [], [0]
    if not rows:
        raise ValueError(f"the data holds fewer than seq_len={seq_len} tokens")
    return rows


def labels(row: Row) -> Tensor:
    """The next token of the same document, IGNORE at each document's last token."""
    t = torch.tensor(row.tokens)
    out = torch.full_like(t, IGNORE)
    out[:-1] = t[1:]
    ends = torch.tensor(row.cu_seqlens[1:]) - 1
    out[ends] = IGNORE
    return out


@dataclass(frozen=True)
class Plan:
    """Which row each data-parallel rank trains on at each step and micro-step."""
    rows: int
    batch: int
    grad_accum: int
    dp: int

    def index(self, step: int, micro: int, dp_rank: int, b: int) -> int:
        n = ((step * self.grad_accum + micro) * self.dp + dp_rank) * self.batch + b
        return n % self.rows  # wrap around: another pass over the same shuffled rows


def batch(rows: list[Row], plan: Plan, step: int, micro: int,
          dp_rank: int) -> tuple[Tensor, Tensor, list[tuple[int, ...]]]:
    """(input ids [B, S], labels [B, S], cu_seqlens per row) of one micro-step."""
    picked = [rows[plan.index(step, micro, dp_rank, b)] for b in range(plan.batch)]
    ids = torch.tensor([r.tokens for r in picked])
    return ids, torch.stack([labels(r) for r in picked]), [r.cu_seqlens for r in picked]
