"""Quest-style page summaries: bound each demoted page's attention without touching it.

A page's summary is the per-KV-head, per-channel min and max of its keys ([Hkv, D] each).
For a query q, q·k = sum_c q_c k_c <= sum_c max(q_c min_c, q_c max_c) for every key k of
the page, so the summary gives an upper bound on the page's largest attention logit. The
summaries stay on the hot device, so a decode step ranks every demoted page with one small
matmul and recalls only the pages whose bound is highest. Ranking stays on the device
(`PageSummaries.select`): the host learns the picks through one read per step and layer.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

PageKey = tuple[int, int, int]
"""(layer, seq, page_id)."""
NAN_BOUNDS = "bounds contain NaN (non-finite keys or query?)"


class Picks(NamedTuple):
    """A ranking of one (layer, seq)'s pages, still on the device."""
    ids: list[int]
    """Page id of each summary row when ranked (a snapshot: rows move on removal)."""
    rows: Tensor
    """int64 [min(n, P)]: rows of the best pages, best first."""
    nan: Tensor
    """bool []: some bound was NaN (the ranking is void)."""


def page_summary(k: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel key min and max of one page: k [Hkv, n, D] -> (kmin, kmax) [Hkv, D].

    valid [Hkv, n] bool: the slots that hold a token (after per-head eviction a head may
    hold fewer, or none: then its kmin = +inf > kmax = -inf, which `page_bounds` turns into
    a bound of -inf). float64 keys give float64 summaries, the others float32 (exact).
    """
    if not isinstance(k, Tensor) or k.dim() != 3 or k.shape[1] < 1:
        raise ValueError(f"k must be a [Hkv, n>=1, D] tensor, got "
                         f"{tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__}")
    if valid is not None and valid.shape != k.shape[:2]:
        raise ValueError(f"valid must be [{k.shape[0]}, {k.shape[1]}], got {tuple(valid.shape)}")
    # half types reduce faster in float32, and exactly (every half value is a float32)
    x = k if k.dtype in (torch.float32, torch.float64) else k.float()
    # every slot full (the usual page): plain reductions; `all()` is only asked on CPU,
    # where it costs no device synchronisation
    if valid is None or k.device.type == "cpu" and bool(valid.all()):
        return x.amin(dim=1), x.amax(dim=1)
    empty = ~valid.to(k.device).unsqueeze(-1)  # fill values are scalars: no host copy
    return (x.masked_fill(empty, float("inf")).amin(dim=1),
            x.masked_fill(empty, float("-inf")).amax(dim=1))


def page_bounds(q: Tensor, kmin: Tensor, kmax: Tensor, groups: int | None = None, *,
                scale: float = 1.0) -> Tensor:
    """Upper bound of scale * q·k over each page's keys, per page and KV head.

    q: [Hq, D]; kmin, kmax: [P, Hkv, D]; query head h reads KV head h // groups
    (groups = Hq // Hkv, GQA). Returns [P, Hkv] in float64 for float64 inputs, else
    float32: the max over the query heads of each group of
    sum_c max(q_c kmin_c, q_c kmax_c) * scale.
    """
    if q.dim() != 2 or kmin.dim() != 3 or kmin.shape != kmax.shape:
        raise ValueError(f"page_bounds takes q [Hq, D] and kmin/kmax [P, Hkv, D] of one "
                         f"shape, got q {tuple(q.shape)}, kmin {tuple(kmin.shape)}, kmax "
                         f"{tuple(kmax.shape)}")
    hq, d = q.shape
    hkv = kmin.shape[1]
    if kmin.shape[2] != d:
        raise ValueError(f"q has head_dim {d}, the summaries {kmin.shape[2]}")
    if groups is None:
        groups = hq // hkv if hkv else 0
    if not isinstance(groups, int) or groups < 1 or groups * hkv != hq:
        raise ValueError(f"groups must be Hq // Hkv = {hq} // {hkv} with Hq = groups * Hkv, "
                         f"got {groups!r}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    acc = torch.float64 if torch.float64 in (q.dtype, kmin.dtype) else torch.float32
    qg = q.to(acc).reshape(hkv, groups, d)
    empty = (kmin > kmax).any(dim=2)  # a head with no token in the page: nothing to bound
    mn = kmin.to(acc).masked_fill(empty[..., None], 0)
    mx = kmax.to(acc).masked_fill(empty[..., None], 0)
    # max(q_c mn_c, q_c mx_c) = max(q_c, 0) mx_c + min(q_c, 0) mn_c: two small matmuls
    b = (torch.einsum("phc,hgc->phg", mx, qg.clamp(min=0))
         + torch.einsum("phc,hgc->phg", mn, qg.clamp(max=0)))
    return (b.amax(dim=2) * scale).masked_fill(empty, float("-inf"))


def select_pages(bounds: Tensor, n: int, ids: Tensor | None = None) -> Tensor:
    """Rows of the n pages with the highest bound, best first.

    bounds: [P] or [P, Hkv] (a page is recalled for all heads, so it ranks by its largest
    head bound). Ties go to the smaller `ids` entry (default: the row index), so the choice
    is deterministic. Returns int64 row indices [min(n, P)]. Raises ValueError on a NaN
    bound, which reads the device (`rank_pages` leaves that check to the caller).
    """
    bounds = _page_maxima(bounds, n)
    if torch.isnan(bounds).any():
        raise ValueError(NAN_BOUNDS)
    return _rank(bounds, n, ids)


def rank_pages(bounds: Tensor, n: int, ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`select_pages` without reading the device: (rows, nan), nan a bool [] tensor that
    is true when some bound is NaN (then the rows mean nothing)."""
    bounds = _page_maxima(bounds, n)
    return _rank(bounds, n, ids), torch.isnan(bounds).any()


def _page_maxima(bounds: Tensor, n: int) -> Tensor:
    """Checked arguments; bounds [P] (a page's largest head bound)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if bounds.dim() == 2:
        bounds = bounds.amax(dim=1)
    if bounds.dim() != 1:
        raise ValueError(f"bounds must be [P] or [P, Hkv], got {tuple(bounds.shape)}")
    return bounds


def _rank(bounds: Tensor, n: int, ids: Tensor | None) -> Tensor:
    order = torch.arange(bounds.shape[0], device=bounds.device)
    if ids is not None:
        if ids.shape != bounds.shape:
            raise ValueError(f"ids must have shape {tuple(bounds.shape)}, got {tuple(ids.shape)}")
        order = torch.sort(ids.to(bounds.device), stable=True).indices
    # stable descending sort over rows already in tie-break order
    best = torch.sort(bounds[order], descending=True, stable=True).indices
    return order[best[:n]]


class PageSummaries:
    """Summaries of demoted pages, on the hot device, grouped per (layer, seq).

    Thread-safe with its own lock, so ranking pages never waits for a transfer in flight."""

    def __init__(self, kv_heads: int, head_dim: int, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.device, self.dtype = torch.device(device), dtype
        # (layer, seq) -> [page ids list, kmin [cap, Hkv, D], kmax [cap, Hkv, D], the ids
        # again as int64 [cap] on the device (ties break on them there)]; rows are kept
        # dense (removal moves the last row into the hole), so bounds need no mask
        self._tables: dict[tuple[int, int], list] = {}
        self._row: dict[PageKey, int] = {}
        self._lock = threading.Lock()
        # on CUDA, summaries may be touched from the transfer worker's side stream: each
        # access waits for the previous one's event, so streams never race on a row
        self._event = torch.cuda.Event() if self.device.type == "cuda" else None

    def _ordered(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._event is None:
            return fn(*args)
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(self._event)
        out = fn(*args)
        self._event.record(cur)
        return out

    def __len__(self) -> int:
        return len(self._row)

    def nbytes(self) -> int:
        """Bytes the summary tables take on the hot device (allocated rows)."""
        return sum(t.numel() * t.element_size() for _, *ts in self._tables.values()
                   for t in ts)

    def __contains__(self, key: object) -> bool:
        return key in self._row

    def add(self, key: PageKey, k: Tensor, valid: Tensor | None = None) -> None:
        """Summarise page `key` from its keys k [Hkv, n, D] (any device); valid [Hkv, n]
        marks the slots holding tokens (default: all)."""
        if key in self._row:
            raise ValueError(f"page {key} already has a summary")
        if k.shape[0] != self.kv_heads or k.shape[2] != self.head_dim:
            raise ValueError(f"k must be [{self.kv_heads}, n, {self.head_dim}], got "
                             f"{tuple(k.shape)}")
        mn, mx = page_summary(k, valid)
        with self._lock:
            self._ordered(self._insert, key, mn, mx)

    def _insert(self, key: PageKey, mn: Tensor, mx: Tensor) -> None:
        if key in self._row:
            raise ValueError(f"page {key} already has a summary")
        layer, seq, page = key
        table = self._tables.get((layer, seq))
        if table is None:
            shape = (16, self.kv_heads, self.head_dim)
            table = [[], torch.empty(shape, dtype=self.dtype, device=self.device),
                     torch.empty(shape, dtype=self.dtype, device=self.device),
                     torch.empty(16, dtype=torch.int64, device=self.device)]
            self._tables[(layer, seq)] = table
        ids, kmin, kmax, idt = table
        row = len(ids)
        if row == kmin.shape[0]:  # grow by doubling: amortised O(1) per page
            table[1] = kmin = torch.cat([kmin, torch.empty_like(kmin)])
            table[2] = kmax = torch.cat([kmax, torch.empty_like(kmax)])
            table[3] = idt = torch.cat([idt, torch.empty_like(idt)])
        kmin[row] = mn.to(device=self.device, dtype=self.dtype)
        kmax[row] = mx.to(device=self.device, dtype=self.dtype)
        idt[row:row + 1].fill_(page)  # a scalar fill: no host-to-device copy
        ids.append(page)
        self._row[key] = row

    def remove(self, key: PageKey) -> None:
        with self._lock:
            self._ordered(self._delete, key)

    def _delete(self, key: PageKey) -> None:
        row = self._row.pop(key)
        ids, kmin, kmax, idt = self._tables[key[:2]]
        last = len(ids) - 1
        if row != last:
            ids[row] = ids[last]
            kmin[row], kmax[row] = kmin[last], kmax[last]
            idt[row:row + 1].fill_(ids[last])
            self._row[(key[0], key[1], ids[row])] = row
        ids.pop()

    def get(self, key: PageKey) -> tuple[Tensor, Tensor]:
        """(kmin, kmax) [Hkv, D] of one page."""
        with self._lock:
            ids, kmin, kmax, _ = self._tables[key[:2]]
            row = self._row[key]
            return self._ordered(lambda: (kmin[row].clone(), kmax[row].clone()))

    def bounds(self, layer: int, seq: int, q: Tensor, *, scale: float = 1.0
               ) -> tuple[list[int], Tensor]:
        """(page ids, bounds [P, Hkv]) of every summarised page of (layer, seq); q [Hq, D]."""
        with self._lock:  # bounds are computed before any row can move
            ids, kmin, kmax, _ = self._tables.get((layer, seq), ([], None, None, None))
            if not ids:
                return [], torch.empty(0, self.kv_heads, device=self.device)
            p = len(ids)
            qd = q.to(self.device)
            return list(ids), self._ordered(
                lambda: page_bounds(qd, kmin[:p], kmax[:p], scale=scale))

    def select(self, layer: int, seq: int, q: Tensor, n: int, *, scale: float = 1.0
               ) -> Picks | None:
        """The n pages of (layer, seq) with the highest bound for q [Hq, D], ranked on the
        device without waiting for it (ties: the smaller page id); None without pages."""
        with self._lock:  # ranked before any row can move
            ids, kmin, kmax, idt = self._tables.get((layer, seq), ([], None, None, None))
            if not ids:
                return None
            p = len(ids)
            qd = q.to(self.device)
            rows, nan = self._ordered(lambda: rank_pages(
                page_bounds(qd, kmin[:p], kmax[:p], scale=scale), n, idt[:p]))
            return Picks(list(ids), rows, nan)

    def top_pages(self, layer: int, seq: int, q: Tensor, n: int, *, scale: float = 1.0
                  ) -> list[PageKey]:
        """Keys of the n pages of (layer, seq) with the highest bound for q [Hq, D], best
        first; ties go to the smaller page id. Reads the device (the decode step ranks
        with `select` and reads every sequence's picks at once)."""
        picks = self.select(layer, seq, q, n, scale=scale)
        if picks is None:
            return []
        if bool(picks.nan):
            raise ValueError(NAN_BOUNDS)
        return [(layer, seq, picks.ids[r]) for r in picks.rows.tolist()]
