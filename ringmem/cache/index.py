"""The replicated index of a `ShardedKVCache`: who holds how many tokens, the same on every
rank, so placement decisions agree without communication. (Whether a rank has room is its
own store's to say, since sequences may share pages; the step's one `agree` carries it.)

Per (layer, seq): `head_counts[rank][h]` tokens of KV head h held by each rank (they differ
after a per-head eviction), `split` (some rank's heads hold different tokens) and `seen`
(tokens ever added: the next global position). A rank's slots in use are the most any of
its heads holds. Collective updates (`refresh`, `sync`) re-read every rank's `PagedStore`
with one gather; local ones (`add`, `advance`) apply what every rank does alike.

`WindowTracker`, replicated alike: the positions each rank holds of each windowed layer
(`cache/window.py` says how sliding-window layers use it).
"""
from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

from ..comm import Group, gather_rows
from .paged import PagedStore


class CacheIndex:
    """Replicated per layer / seq / rank / KV head token counts and next positions."""

    def __init__(self, *, num_layers: int, max_seqs: int, world: int, kv_heads: int,
                 page_size: int, num_pages: int, capacity: int,
                 layer_pages: list[int] | None = None) -> None:
        self.world, self.kv_heads, self.page_size = world, kv_heads, page_size
        self.num_pages, self.capacity = num_pages, capacity
        # pages per rank of each layer's pool (windowed layers have smaller pools)
        self.layer_pages = layer_pages or [num_pages] * num_layers
        self.head_counts = [[self._zeros() for _ in range(max_seqs)]
                            for _ in range(num_layers)]
        self.split = [[False] * max_seqs for _ in range(num_layers)]
        self.seen = [[0] * max_seqs for _ in range(num_layers)]

    def _zeros(self) -> list[list[int]]:
        return [[0] * self.kv_heads for _ in range(self.world)]

    # ------------------------------------------------------------ reading
    def counts(self, layer: int, seq: int) -> list[int]:
        """Per rank: slots in use (the most any KV head holds)."""
        return [max(r) for r in self.head_counts[layer][seq]]

    def held(self, layer: int, seq: int) -> int:
        return sum(self.counts(layer, seq))

    def place_decode(self, layer: int, drops: list[list[int]] | None = None) -> list[int]:
        """The rank that stores each sequence's new token: the least loaded, lowest rank on
        ties. drops[seq][rank]: tokens a sliding window evicts first. (Whether it has room
        is each rank's own store's to say: pages may be shared between sequences.)"""
        seqs = len(self.seen[layer])
        after = [self.counts(layer, s) for s in range(seqs)]
        if drops is not None:
            after = [[c - d for c, d in zip(row, dr)] for row, dr in zip(after, drops)]
        owners = []
        for s in range(seqs):
            owner = min(range(self.world), key=lambda r: (after[s][r], r))
            after[s][owner] += 1
            owners.append(owner)
        return owners

    # ------------------------------------------------------------ updates
    def add(self, layer: int, seq: int, rank: int, n: int) -> None:
        """`rank` stored n more tokens of `seq` in every KV head."""
        row = self.head_counts[layer][seq][rank]
        row[:] = [x + n for x in row]

    def remove(self, layer: int, seq: int, rank: int, n: int) -> None:
        """`rank` dropped n tokens of `seq` from every KV head (a sliding window)."""
        row = self.head_counts[layer][seq][rank]
        row[:] = [x - n for x in row]

    def advance(self, layer: int, seq: int, n: int) -> None:
        self.seen[layer][seq] += n

    def fork(self, src: int, dst: int) -> None:
        """`dst` now holds what `src` holds (`ShardedKVCache.fork`)."""
        for layer in range(len(self.seen)):
            self.head_counts[layer][dst] = [list(r) for r in self.head_counts[layer][src]]
            self.split[layer][dst] = self.split[layer][src]
            self.seen[layer][dst] = self.seen[layer][src]

    def reset(self, seq: int) -> None:
        for layer in range(len(self.seen)):
            self.head_counts[layer][seq] = self._zeros()
            self.split[layer][seq] = False
            self.seen[layer][seq] = 0

    def refresh(self, layer: int, seq: int, store: PagedStore, group: Group,
                wire: torch.device) -> Tensor:
        """Re-read every rank's per-head counts of (layer, seq) (collective: one gather).
        Returns the gathered rows [world, Hkv + 1] (counts, split flag)."""
        mine = torch.tensor([*store.hlens[seq], int(store.split[seq])], dtype=torch.int64)
        rows = (gather_rows(mine.to(wire), group, self.world).cpu()
                if self.world > 1 else mine[None])
        self.head_counts[layer][seq] = [[int(x) for x in r[:self.kv_heads]] for r in rows]
        self.split[layer][seq] = bool(rows[:, self.kv_heads].any())
        return rows

    def sync(self, stores: list[PagedStore], group: Group, wire: torch.device) -> None:
        """Re-read every layer and sequence from every rank's stores, and move each next
        position past every position held anywhere (collective: one gather)."""
        hkv, seqs = self.kv_heads, len(self.seen[0])
        mine = []
        for st in stores:
            for s in range(seqs):
                top = max((int(st.pos[h, st.head_slots(s, h)].max()) + 1
                           for h in range(hkv) if st.hlens[s][h]), default=0)
                mine += [*st.hlens[s], int(st.split[s]), top]
        mine_t = torch.tensor(mine, dtype=torch.int64)
        rows = (gather_rows(mine_t.to(wire), group, self.world).cpu()
                if self.world > 1 else mine_t.unsqueeze(0))
        table = rows.reshape(self.world, len(stores), seqs, hkv + 2)
        for lay in range(len(stores)):
            for s in range(seqs):
                t = table[:, lay, s]
                self.head_counts[lay][s] = [[int(x) for x in r[:hkv]] for r in t]
                self.split[lay][s] = bool(t[:, hkv].any())
                self.seen[lay][s] = max(self.seen[lay][s], int(t[:, -1].max()))

    # ------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {"seen": self.seen, "head_counts": self.head_counts, "split": self.split}

    def load_state(self, state: dict) -> None:
        self.seen, self.head_counts = state["seen"], state["head_counts"]
        self.split = state["split"]


class WindowTracker:
    """Replicated: the positions each rank holds of each windowed (layer, seq)."""

    def __init__(self, windows: list[int], world: int, max_seqs: int) -> None:
        self.windows = windows
        self.held: dict[int, list[list[deque[int]]]] = {
            layer: [[deque() for _ in range(world)] for _ in range(max_seqs)]
            for layer, left in enumerate(windows) if left >= 0}

    def windowed(self, layer: int) -> bool:
        return layer in self.held

    def add(self, layer: int, seq: int, rank: int, positions: list[int]) -> None:
        self.held[layer][seq][rank].extend(positions)

    def drops(self, layer: int, seq: int, threshold: int) -> list[int]:
        """Per rank: tokens of (layer, seq) older than `threshold` (to drop)."""
        out = []
        for held in self.held[layer][seq]:
            n = 0
            while n < len(held) and held[n] < threshold:
                n += 1
            out.append(n)
        return out

    def drop(self, layer: int, seq: int, counts: list[int]) -> None:
        for held, n in zip(self.held[layer][seq], counts):
            for _ in range(n):
                held.popleft()

    def positions(self, layer: int, seq: int, rank: int) -> list[int]:
        return list(self.held[layer][seq][rank])

    def fork(self, src: int, dst: int) -> None:
        for rows in self.held.values():
            rows[dst] = [deque(h) for h in rows[src]]

    def reset(self, seq: int) -> None:
        for rows in self.held.values():
            for held in rows[seq]:
                held.clear()

    def state(self) -> list[list[list[list[int]]] | None]:
        """Per layer (None: not windowed), per seq, per rank: the positions held (JSON)."""
        return [[[list(h) for h in rows] for rows in self.held[layer]]
                if layer in self.held else None for layer in range(len(self.windows))]

    def load_state(self, state: list[list[list[list[int]]] | None]) -> None:
        """Inverse of `state` (a checkpoint of the same windows, world and max_seqs)."""
        for layer, rows in self.held.items():
            for seq, per_rank in enumerate(rows):
                for held, pos in zip(per_rank, state[layer][seq]):
                    held.clear()
                    held.extend(int(p) for p in pos)
