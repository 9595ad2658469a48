"""One layer's K/V on one rank: paged storage with per-token metadata.

Pool layout is head-major over the whole pool, k[h, page * page_size + slot, d], so a page
is a token range in every head and a run of consecutive pages is, per head, one contiguous
[n, D] block: decode reads it with one batched matmul and prefill can hand it to any block
backend as a zero-copy [1, n, Hkv, D] view. Pages are handed out in ascending order, so a
sequence filled in one go occupies a single run.
"""
from __future__ import annotations

import torch
from torch import Tensor


class PagedStore:
    """K/V pages of one layer on one rank, for up to `max_seqs` sequences."""

    def __init__(self, *, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
                 max_seqs: int, dtype: torch.dtype, device: torch.device) -> None:
        slots = num_pages * page_size
        self.page_size, self.num_pages = page_size, num_pages
        self.k = torch.zeros(kv_heads, slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(kv_heads, slots, head_dim, dtype=dtype, device=device)
        # per-token metadata: global position (-1: empty slot) and importance score
        self.pos = torch.full((slots,), -1, dtype=torch.int64, device=device)
        self.score = torch.zeros(slots, dtype=torch.float32, device=device)
        self.tier = torch.zeros(num_pages, dtype=torch.int8)  # 0 = hot (tiering issue)
        self._free = list(range(num_pages - 1, -1, -1))  # pop() yields 0, 1, 2, ...
        self.tables: list[list[int]] = [[] for _ in range(max_seqs)]
        self.lens = [0] * max_seqs

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_needed(self, seq: int, n: int) -> int:
        room = -self.lens[seq] % self.page_size  # free slots in the last page
        return -(-max(0, n - room) // self.page_size)

    def append(self, seq: int, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Store n tokens: k, v [n, Hkv, D]; pos [n] global positions."""
        n = k.shape[0]
        need = self.pages_needed(seq, n)
        if need > len(self._free):
            raise ValueError(f"KV cache capacity exceeded: sequence {seq} needs {need} more "
                             f"page(s) of {self.page_size} tokens, {len(self._free)} free of "
                             f"{self.num_pages}")
        table, done = self.tables[seq], 0
        while done < n:
            fill = self.lens[seq] % self.page_size
            if fill == 0:
                table.append(self._free.pop())
            page = table[-1]
            m = min(self.page_size - fill, n - done)
            lo = page * self.page_size + fill
            self.k[:, lo:lo + m] = k[done:done + m].transpose(0, 1)
            self.v[:, lo:lo + m] = v[done:done + m].transpose(0, 1)
            self.pos[lo:lo + m] = pos[done:done + m]
            done += m
            self.lens[seq] += m

    def runs(self, seq: int) -> list[tuple[int, int]]:
        """Token slot ranges [lo, hi) of `seq`, merging consecutive pages."""
        out: list[tuple[int, int]] = []
        table, ps = self.tables[seq], self.page_size
        for i, page in enumerate(table):
            lo = page * ps
            hi = lo + (ps if i + 1 < len(table) else self.lens[seq] - i * ps)
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
        return out

    def view(self, seq: int) -> tuple[Tensor, Tensor, Tensor]:
        """(k, v [1, n, Hkv, D], pos [n]) of `seq`: views when it is one run, else copies."""
        runs = self.runs(seq)
        if not runs:
            e = self.k[:, :0].permute(1, 0, 2).unsqueeze(0)
            return e, e, self.pos[:0]
        ks = [self.k[:, lo:hi] for lo, hi in runs]
        vs = [self.v[:, lo:hi] for lo, hi in runs]
        ps = [self.pos[lo:hi] for lo, hi in runs]
        k, v, p = ((ks[0], vs[0], ps[0]) if len(runs) == 1 else
                   (torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(ps)))
        return k.permute(1, 0, 2).unsqueeze(0), v.permute(1, 0, 2).unsqueeze(0), p

    def reset(self, seq: int) -> None:
        for page in reversed(self.tables[seq]):
            lo = page * self.page_size
            self.pos[lo:lo + self.page_size] = -1
            self.score[lo:lo + self.page_size] = 0
            self._free.append(page)
        self.tables[seq], self.lens[seq] = [], 0
