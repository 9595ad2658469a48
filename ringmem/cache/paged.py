"""One layer's K/V on one rank: paged storage with per-(head, token) metadata.

Pool layout is head-major over the whole pool, k[h, page * page_size + slot, d], so a page
is a token range in every head and a run of consecutive pages is, per head, one contiguous
[n, D] block: decode reads it with one batched matmul and prefill can hand it to any block
backend as a zero-copy [1, n, Hkv, D] view. Pages are handed out in ascending order, so a
sequence filled in one go occupies a single run.

Per-head eviction (different KV heads keep different tokens) is stored exactly by packing
each head independently inside the sequence's pages: head h holds its `hlens[seq][h]` tokens
in the first hlens[h] logical slots (page table order), with its own positions
`pos[h, slot]` and scores `score[h, slot]`. `keep` compacts every head in place (survivors
keep their order) and frees the pages no head reaches any more, so a sequence occupies
ceil(max_h hlens[h] / page_size) pages. Until an eviction makes the heads differ, every
head holds the same tokens in the same slots (`uniform`), and the whole-pool views and the
batched decode path apply unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor


class PagedStore:
    """K/V pages of one layer on one rank, for up to `max_seqs` sequences."""

    def __init__(self, *, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
                 max_seqs: int, dtype: torch.dtype, device: torch.device) -> None:
        slots = num_pages * page_size
        self.page_size, self.num_pages, self.kv_heads = page_size, num_pages, kv_heads
        self.k = torch.zeros(kv_heads, slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(kv_heads, slots, head_dim, dtype=dtype, device=device)
        # per-(head, slot) metadata: global position (-1: empty) and importance score
        self.pos = torch.full((kv_heads, slots), -1, dtype=torch.int64, device=device)
        self.score = torch.zeros(kv_heads, slots, dtype=torch.float32, device=device)
        self._free = list(range(num_pages - 1, -1, -1))  # pop() yields 0, 1, 2, ...
        self.tables: list[list[int]] = [[] for _ in range(max_seqs)]
        self.lens = [0] * max_seqs  # logical slots in use: max over heads of hlens
        self.hlens = [[0] * kv_heads for _ in range(max_seqs)]
        self.split = [False] * max_seqs  # heads may hold different tokens

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def uniform(self, seq: int) -> bool:
        """True when every head holds the same tokens in the same slots."""
        return not self.split[seq]

    def pages_needed(self, seq: int, n: int) -> int:
        room = -self.lens[seq] % self.page_size  # free slots in the last page
        return -(-max(0, n - room) // self.page_size)

    def slots(self, seq: int, lo: int, hi: int) -> Tensor:
        """Pool slot indices of logical slots [lo, hi) of `seq` (int64 [hi - lo])."""
        ps = self.page_size
        idx = torch.arange(lo, hi, device=self.pos.device)
        table = torch.tensor(self.tables[seq], dtype=torch.int64, device=self.pos.device)
        return table[idx // ps] * ps + idx % ps

    def append(self, seq: int, k: Tensor, v: Tensor, pos: Tensor,
               score: Tensor | None = None) -> None:
        """Store n tokens in every head: k, v [n, Hkv, D]; pos [n] global positions;
        score [n, Hkv] initial scores (default 0)."""
        n = k.shape[0]
        need = self.pages_needed(seq, n)
        if need > len(self._free):
            raise ValueError(f"KV cache capacity exceeded: sequence {seq} needs {need} more "
                             f"page(s) of {self.page_size} tokens, {len(self._free)} free of "
                             f"{self.num_pages}")
        table = self.tables[seq]
        for _ in range(need):
            table.append(self._free.pop())
        sc = (torch.zeros(n, self.kv_heads, dtype=torch.float32, device=self.score.device)
              if score is None else score.to(torch.float32))
        if self.uniform(seq):  # the common case: page-sized slices, all heads at once
            done, base = 0, self.lens[seq]
            while done < n:
                fill = (base + done) % self.page_size
                page = table[(base + done) // self.page_size]
                m = min(self.page_size - fill, n - done)
                lo = page * self.page_size + fill
                self.k[:, lo:lo + m] = k[done:done + m].transpose(0, 1)
                self.v[:, lo:lo + m] = v[done:done + m].transpose(0, 1)
                self.pos[:, lo:lo + m] = pos[done:done + m]
                self.score[:, lo:lo + m] = sc[done:done + m].t()
                done += m
        else:  # heads are packed to different lengths: each appends after its own tokens
            for h, hl in enumerate(self.hlens[seq]):
                idx = self.slots(seq, hl, hl + n)
                self.k[h, idx] = k[:, h]
                self.v[h, idx] = v[:, h]
                self.pos[h, idx] = pos.to(self.pos.device)
                self.score[h, idx] = sc[:, h]
        self.hlens[seq] = [hl + n for hl in self.hlens[seq]]
        self.lens[seq] = max(self.hlens[seq])

    def append_heads(self, seq: int, k: list[Tensor], v: list[Tensor], pos: list[Tensor],
                     score: list[Tensor]) -> None:
        """Store n_h tokens in head h: k[h], v[h] [n_h, D]; pos[h] [n_h]; score[h] [n_h]."""
        n = [x.shape[0] for x in k]
        if len(n) != self.kv_heads:
            raise ValueError(f"need one entry per KV head ({self.kv_heads}), got {len(n)}")
        new = [hl + m for hl, m in zip(self.hlens[seq], n)]
        need = self.pages_needed(seq, max(new) - self.lens[seq])
        if need > len(self._free):
            raise ValueError(f"KV cache capacity exceeded: sequence {seq} needs {need} more "
                             f"page(s) of {self.page_size} tokens, {len(self._free)} free of "
                             f"{self.num_pages}")
        for _ in range(need):
            self.tables[seq].append(self._free.pop())
        same = len(set(n)) == 1 and all(torch.equal(p, pos[0]) for p in pos)
        self.split[seq] = self.split[seq] or not same
        for h, hl in enumerate(self.hlens[seq]):
            idx = self.slots(seq, hl, new[h])
            self.k[h, idx] = k[h]
            self.v[h, idx] = v[h]
            self.pos[h, idx] = pos[h].to(self.pos.device)
            self.score[h, idx] = score[h].to(torch.float32)
        self.hlens[seq] = new
        self.lens[seq] = max(new)

    def runs(self, seq: int, head: int | None = None) -> list[tuple[int, int]]:
        """Pool slot ranges [lo, hi) of `seq` (of one head's tokens when `head` is given),
        merging consecutive pages."""
        n = self.lens[seq] if head is None else self.hlens[seq][head]
        out: list[tuple[int, int]] = []
        ps = self.page_size
        for i, page in enumerate(self.tables[seq]):
            if i * ps >= n:
                break
            lo = page * ps
            hi = lo + min(ps, n - i * ps)
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
        return out

    def head_runs(self, seq: int) -> list[list[tuple[int, int]]]:
        return [self.runs(seq, h) for h in range(self.kv_heads)]

    def view(self, seq: int, head: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(k, v [1, n, Hkv, D], pos [n]) of `seq`: views when it is one run, else copies.

        With `head`, that head's tokens only: k, v [1, n_h, 1, D], pos [n_h]. Without, the
        heads must hold the same tokens (`uniform`).
        """
        if head is None and not self.uniform(seq):
            raise ValueError(f"sequence {seq}: heads hold different tokens after a per-head "
                             f"eviction ({self.hlens[seq]}); take per-head views")
        hs = slice(None) if head is None else slice(head, head + 1)
        runs = self.runs(seq, head)
        ph = 0 if head is None else head
        if not runs:
            e = self.k[hs, :0].permute(1, 0, 2).unsqueeze(0)
            return e, e, self.pos[ph, :0]
        ks = [self.k[hs, lo:hi] for lo, hi in runs]
        vs = [self.v[hs, lo:hi] for lo, hi in runs]
        ps = [self.pos[ph, lo:hi] for lo, hi in runs]
        k, v, p = ((ks[0], vs[0], ps[0]) if len(runs) == 1 else
                   (torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(ps)))
        return k.permute(1, 0, 2).unsqueeze(0), v.permute(1, 0, 2).unsqueeze(0), p

    def head_slots(self, seq: int, head: int) -> Tensor:
        """Pool slot indices of head `head`'s tokens of `seq`, in logical order (built on
        the pool's device from the host-side page table: no host-device copy)."""
        dev = self.pos.device
        runs = self.runs(seq, head)
        if not runs:
            return torch.zeros(0, dtype=torch.int64, device=dev)
        return torch.cat([torch.arange(lo, hi, device=dev) for lo, hi in runs])

    def keep(self, seq: int, masks: list[Tensor]) -> None:
        """Keep, per head h, the tokens where masks[h] ([hlens[seq][h]] bool, logical order)
        is True; pack the survivors to the front and free pages no head reaches."""
        if len(masks) != self.kv_heads:
            raise ValueError(f"need one mask per KV head ({self.kv_heads}), got {len(masks)}")
        same = all(torch.equal(m, masks[0]) for m in masks)
        new = []
        for h, mask in enumerate(masks):
            n = self.hlens[seq][h]
            if mask.shape != (n,):
                raise ValueError(f"masks[{h}] must have shape ({n},), got {tuple(mask.shape)}")
            src = self.slots(seq, 0, n)
            keep = src[mask.to(src.device)]
            m = keep.numel()
            if m < n:  # gather first (copies), then write: safe although ranges overlap
                dst = src[:m]
                for t in (self.k, self.v, self.pos, self.score):
                    t[h, dst] = t[h, keep]
                self.pos[h, src[m:]] = -1
                self.score[h, src[m:]] = 0
            new.append(m)
        self.hlens[seq] = new
        self.lens[seq] = max(new)
        self.split[seq] = self.split[seq] or not same
        table = self.tables[seq]
        while len(table) * self.page_size - self.page_size >= self.lens[seq] and table:
            self._free.append(table.pop())

    def reset(self, seq: int) -> None:
        for page in reversed(self.tables[seq]):
            lo = page * self.page_size
            self.pos[:, lo:lo + self.page_size] = -1
            self.score[:, lo:lo + self.page_size] = 0
            self._free.append(page)
        self.tables[seq], self.lens[seq] = [], 0
        self.hlens[seq] = [0] * self.kv_heads
        self.split[seq] = False

    # ------------------------------------------------------------ checkpoints
    @property
    def free_list(self) -> list[int]:
        """Free pages in hand-out order (last first), for a checkpoint."""
        return list(self._free)

    def load_tables(self, tables: list[list[int]], hlens: list[list[int]], lens: list[int],
                    split: list[bool], free: list[int]) -> None:
        """Restore the page tables and lengths a checkpoint saved (the pools are copied in
        by the caller)."""
        self.tables, self.hlens, self.lens = tables, hlens, lens
        self.split, self._free = split, list(free)
