"""One layer's K/V on one rank: paged storage with per-(head, token) metadata.

Pool layout is head-major over the whole pool, k[h, page * page_size + slot, d], so a page
is a token range in every head and a run of consecutive pages is, per head, one contiguous
[n, D] block: decode reads it with one batched matmul and prefill can hand it to any block
backend as a zero-copy [1, n, Hkv, D] view. Pages are handed out in ascending order, so a
sequence filled in one go occupies a single run.

Per-head eviction (different KV heads keep different tokens) is stored exactly by packing
each head independently inside the sequence's pages: head h holds its `hlens[seq][h]` tokens
in the first hlens[h] logical slots (page table order, from slot `off[seq]` of the first
page), with its own positions `pos[h, slot]` and scores `score[h, slot]`. `keep` compacts
every head in place (survivors keep their order) and frees the pages no head reaches any
more. Until an eviction makes the heads differ, every head holds the same tokens in the
same slots (`uniform`), and the whole-pool views and the batched decode path apply.
A window's oldest tokens leave in O(1): `off` moves on instead of the survivors moving back
(they move only when the offset would cost a page).

Shared pages (`fork`): a sequence forked from another shares its full pages (reference
counted, `refs`) and gets a private copy of the last, partly filled one, so many questions
about one document hold the document once. Writes never touch a shared page: appends and
score updates copy the pages they would write first (copy on write), and `keep` over
shared pages gathers the survivors into fresh private pages. A page returns to the free
list when no sequence references it.
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
        self.refs = [0] * num_pages  # sequences whose page table holds the page
        self.tables: list[list[int]] = [[] for _ in range(max_seqs)]
        self.lens = [0] * max_seqs  # logical slots in use: max over heads of hlens
        self.hlens = [[0] * kv_heads for _ in range(max_seqs)]
        self.split = [False] * max_seqs  # heads may hold different tokens
        # dead slots before the first token, in the first page: dropping a window's oldest
        # tokens moves this instead of the survivors (no table: 0)
        self.off = [0] * max_seqs

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def pages_in_use(self) -> int:
        """Distinct pages referenced by some sequence (shared pages count once)."""
        return self.num_pages - len(self._free)

    def _take(self, seq: int, need: int) -> None:
        """Append `need` fresh private pages to `seq`'s table, or raise (nothing taken)."""
        if need > len(self._free):
            raise ValueError(f"KV cache capacity exceeded: sequence {seq} needs {need} more "
                             f"page(s) of {self.page_size} tokens, {len(self._free)} free of "
                             f"{self.num_pages}")
        for _ in range(need):
            page = self._free.pop()
            self.refs[page] = 1
            self.tables[seq].append(page)

    def _release(self, page: int) -> None:
        """Drop one reference to `page`; the last one frees it (and clears its metadata)."""
        self.refs[page] -= 1
        if self.refs[page] == 0:
            lo = page * self.page_size
            self.pos[:, lo:lo + self.page_size] = -1
            self.score[:, lo:lo + self.page_size] = 0
            self._free.append(page)

    def shared(self, seq: int) -> bool:
        """Whether `seq` references a page another sequence references too."""
        return any(self.refs[p] > 1 for p in self.tables[seq])

    def own(self, seq: int, first_slot: int = 0) -> None:
        """Copy on write: give `seq` private copies of its shared pages from the one holding
        logical slot `first_slot` on (those a write there would touch)."""
        table, ps = self.tables[seq], self.page_size
        first = (first_slot + self.off[seq]) // ps
        shared = [i for i in range(first, len(table)) if self.refs[table[i]] > 1]
        if len(shared) > len(self._free):
            raise ValueError(f"KV cache capacity exceeded: sequence {seq} needs "
                             f"{len(shared)} page(s) to copy shared pages before writing, "
                             f"{len(self._free)} free of {self.num_pages}")
        for i in shared:
            old, new = table[i], self._free.pop()
            src, dst = slice(old * ps, old * ps + ps), slice(new * ps, new * ps + ps)
            for t in (self.k, self.v, self.pos, self.score):
                t[:, dst] = t[:, src]
            self.refs[new], table[i] = 1, new
            self.refs[old] -= 1  # still referenced by another sequence: never freed here

    def fork_pages(self, src: int, share: bool = True) -> int:
        """Pages a `fork` of `src` copies (the others are shared)."""
        ps, end = self.page_size, self.lens[src] + (0 if self._costly(src) else self.off[src])
        return -(-end // ps) - (end // ps if share and not self.split[src] else 0)

    def fork(self, src: int, dst: int, share: bool = True) -> None:
        """`dst` (empty) becomes a copy of `src` that shares its full pages (`share`; else
        every page is copied); the last, partly filled page is copied, so appends to either
        never touch a shared page. Heads packed to different lengths share nothing."""
        if self.tables[dst] or self.lens[dst]:
            raise ValueError(f"sequence {dst} is not empty: reset it before forking into it")
        self._tidy(src)  # a copy holds no more pages than its tokens need
        table, n = self.tables[src], self.lens[src]
        copy, ps = self.fork_pages(src, share), self.page_size
        full = len(table) - copy
        if copy > len(self._free):
            raise ValueError(f"KV cache capacity exceeded: forking sequence {src} into {dst} "
                             f"needs {copy} page(s), {len(self._free)} free of "
                             f"{self.num_pages}")
        for page in table[:full]:
            self.refs[page] += 1
            self.tables[dst].append(page)
        for page in table[full:]:
            new = self._free.pop()
            src_s, dst_s = slice(page * ps, page * ps + ps), slice(new * ps, new * ps + ps)
            for t in (self.k, self.v, self.pos, self.score):
                t[:, dst_s] = t[:, src_s]
            self.refs[new] = 1
            self.tables[dst].append(new)
        self.lens[dst], self.hlens[dst] = n, list(self.hlens[src])
        self.split[dst], self.off[dst] = self.split[src], self.off[src]

    def uniform(self, seq: int) -> bool:
        """True when every head holds the same tokens in the same slots."""
        return not self.split[seq]

    def pages_needed(self, seq: int, n: int) -> int:
        room = -(self.off[seq] + self.lens[seq]) % self.page_size  # free in the last page
        return -(-max(0, n - room) // self.page_size)

    def pages_to_grow(self, seq: int, drop: int, add: int) -> int:
        """New pages `seq` needs to drop its `drop` oldest tokens (a window's), then append
        `add` (negative: it shrinks); the offset costs none (`_tidy` sees to it)."""
        return -(-(self.lens[seq] - drop + add) // self.page_size) - len(self.tables[seq])

    def _costly(self, seq: int, n: int = 0) -> bool:
        """Whether `_tidy(seq, n)` moves the tokens."""
        ps, off, held = self.page_size, self.off[seq], self.lens[seq] + n
        return bool(off) and -(-(off + held) // ps) > -(-held // ps) and not self.shared(seq)

    def _tidy(self, seq: int, n: int = 0) -> None:
        """Before `seq` grows by n tokens: if its offset would cost a page (and no other
        sequence reads its pages), move its tokens to offset 0 (at most once a page)."""
        if not self._costly(seq, n):
            return
        off = self.off[seq]
        srcs = [self.slots(seq, 0, hl) for hl in self.hlens[seq]]
        self.off[seq] = 0
        for h, src in enumerate(srcs):  # gather (copies), then write: ranges may overlap
            dst = self.slots(seq, 0, src.numel())
            for t in (self.k, self.v, self.pos, self.score):
                t[h, dst] = t[h, src]
            dead = self.slots(seq, src.numel(), src.numel() + off)
            self.pos[h, dead], self.score[h, dead] = -1, 0
        self._trim(seq)

    def slots(self, seq: int, lo: int, hi: int) -> Tensor:
        """Pool slot indices of logical slots [lo, hi) of `seq` (int64 [hi - lo])."""
        ps, idx = self.page_size, torch.arange(lo, hi, device=self.pos.device) + self.off[seq]
        table = torch.tensor(self.tables[seq], dtype=torch.int64, device=self.pos.device)
        return table[idx // ps] * ps + idx % ps

    def append(self, seq: int, k: Tensor, v: Tensor, pos: Tensor,
               score: Tensor | None = None) -> None:
        """Store n tokens in every head: k, v [n, Hkv, D]; pos [n] global positions;
        score [n, Hkv] initial scores (default 0)."""
        n = k.shape[0]
        if n == 0:
            return
        self._tidy(seq, n)
        self.own(seq, min(self.hlens[seq]))
        self._take(seq, self.pages_needed(seq, n))
        table = self.tables[seq]
        sc = (torch.zeros(n, self.kv_heads, dtype=torch.float32, device=self.score.device)
              if score is None else score.to(torch.float32))
        if self.uniform(seq):  # the common case: page-sized slices, all heads at once
            done, base = 0, self.off[seq] + self.lens[seq]
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
        self._tidy(seq, max(new) - self.lens[seq])
        self.own(seq, min(self.hlens[seq]))
        self._take(seq, self.pages_needed(seq, max(new) - self.lens[seq]))
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
        ps, off = self.page_size, self.off[seq]
        for i, page in enumerate(self.tables[seq]):
            if i * ps >= off + n:
                break
            lo = page * ps + max(0, off - i * ps)
            hi = page * ps + min(ps, off + n - i * ps)
            if lo >= hi:
                continue
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
        for h, mask in enumerate(masks):
            n = self.hlens[seq][h]
            if mask.shape != (n,):
                raise ValueError(f"masks[{h}] must have shape ({n},), got {tuple(mask.shape)}")
        if all(bool(m.all()) for m in masks):  # nothing leaves: shared pages stay shared
            return
        same = all(torch.equal(m, masks[0]) for m in masks)
        front = masks[0].numel() - int(masks[0].sum())  # a window sliding on drops these
        if self.shared(seq):
            self._keep_shared(seq, masks)
        elif same and self.uniform(seq) and bool(masks[0][front:].all()):
            self._drop_front(seq, front)
        else:
            new = []
            for h, mask in enumerate(masks):
                n = self.hlens[seq][h]
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
            self._trim(seq)
        self.split[seq] = self.split[seq] or not same

    def _trim(self, seq: int) -> None:
        """Free the pages after `seq`'s last token (all of them once it holds none)."""
        table, ps = self.tables[seq], self.page_size
        while table and (len(table) * ps - ps >= self.off[seq] + self.lens[seq]
                         or not self.lens[seq]):
            self._release(table.pop())
        if not table:
            self.off[seq] = 0

    def _drop_front(self, seq: int, m: int) -> None:
        """Drop the `m` oldest tokens of a uniform, unshared `seq` without moving the
        others: the first token's offset advances, pages left behind are freed."""
        idx = self.slots(seq, 0, m)
        self.pos[:, idx], self.score[:, idx] = -1, 0
        table, ps = self.tables[seq], self.page_size
        self.off[seq], self.lens[seq] = self.off[seq] + m, self.lens[seq] - m
        self.hlens[seq] = [hl - m for hl in self.hlens[seq]]
        while table and self.off[seq] >= ps:
            self._release(table.pop(0))
            self.off[seq] -= ps
        self._trim(seq)

    def keep_short(self, seq: int, masks: list[Tensor]) -> int:
        """Pages `keep(seq, masks)` would lack (only a sequence with shared pages needs new
        ones: its survivors are gathered into fresh private pages)."""
        if all(bool(m.all()) for m in masks) or not self.shared(seq):
            return 0
        need = -(-max(int(m.sum()) for m in masks) // self.page_size)
        freed = sum(self.refs[p] == 1 for p in self.tables[seq])
        return max(0, need - len(self._free) - freed)

    def _keep_shared(self, seq: int, masks: list[Tensor]) -> None:
        """`keep` for a sequence with shared pages: the survivors are gathered (copies),
        the old pages released, and fresh private pages written; nothing shared changes."""
        table, ps = self.tables[seq], self.page_size
        kept = []
        for h, mask in enumerate(masks):
            src = self.slots(seq, 0, self.hlens[seq][h])
            idx = src[mask.to(src.device)]
            kept.append([t[h, idx] for t in (self.k, self.v, self.pos, self.score)])
        new = [x[0].shape[0] for x in kept]
        need, freed = -(-max(new) // ps), sum(self.refs[p] == 1 for p in table)
        if need > len(self._free) + freed:  # checked before anything is released
            raise ValueError(f"KV cache capacity exceeded: sequence {seq} needs {need} "
                             f"page(s) for its kept tokens, {len(self._free) + freed} free "
                             f"of {self.num_pages}")
        for page in reversed(table):
            self._release(page)
        self.tables[seq], self.off[seq] = [], 0
        self._take(seq, need)
        for h, rows in enumerate(kept):
            idx = self.slots(seq, 0, new[h])
            for t, x in zip((self.k, self.v, self.pos, self.score), rows):
                t[h, idx] = x
        self.hlens[seq], self.lens[seq] = new, max(new)

    def reset(self, seq: int) -> None:
        for page in reversed(self.tables[seq]):
            self._release(page)
        self.tables[seq], self.lens[seq] = [], 0
        self.hlens[seq] = [0] * self.kv_heads
        self.split[seq], self.off[seq] = False, 0

    # ------------------------------------------------------------ checkpoints
    @property
    def free_list(self) -> list[int]:
        """Free pages in hand-out order (last first), for a checkpoint."""
        return list(self._free)

    def load_tables(self, tables: list[list[int]], hlens: list[list[int]], lens: list[int],
                    split: list[bool], free: list[int], off: list[int] | None = None) -> None:
        """Restore the page tables and lengths a checkpoint saved (the pools are copied in
        by the caller; `off` None: a checkpoint from before offsets, all 0)."""
        self.tables, self.hlens, self.lens = tables, hlens, lens
        self.split, self._free = split, list(free)
        self.off = list(off) if off is not None else [0] * len(tables)
        self.refs = [0] * self.num_pages
        for page in (p for table in tables for p in table):
            self.refs[page] += 1
