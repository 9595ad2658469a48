"""One decode step over a sharded cache, as a pipeline read top to bottom:

    local partial -> tier recall -> cross-rank merge -> own token -> store

1. local partial: each rank attends the new queries to its hot pages (the backend's
   `decode`; when eviction needs each key's score or heads hold different tokens, the
   CPU kernel's or else the torch backend's in-place pass);
2. tier recall: with tiers, the pending and recalled demoted entries (with attend="host",
   every host-tier page instead, attended where it lives by the CPU kernel), merged by lse;
3. cross-rank merge: first a small CPU check (`check_step`: errors, the step counters, a
   full cache) that every rank raises from together, then the one device collective;
4. own token: the new token's own term (every rank has its k, v), merged by lse;
5. store: the least-loaded rank (decided from the replicated index, identically on every
   rank) stores the new token; with eviction the coordinator's hook runs around it.
"""
from __future__ import annotations

from functools import partial as bind
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from ..agree import CAPACITY, agree
from ..backends import get_backend
from ..call import check_extras
from ..comm import Group, gather_rows
from ..eviction.records import DecodeStep
from ..partial import Partial, attend, empty, merge, merge_weighted, with_sink
from .checks import check_finite, check_index, check_scale, check_tensor
from .config import MERGES
from .window import evict

if TYPE_CHECKING:
    from .parts import Parts
    from .tiers import Gathered



def digest(*ts: Tensor) -> Tensor:
    """[sum, weighted sum, sum of |x|] of the tensors (float64, on their device): a cheap
    fingerprint of inputs every rank must hold identically."""
    x = torch.cat([t.detach().double().flatten() for t in ts])
    w = torch.arange(x.numel(), device=x.device, dtype=torch.float64).remainder_(7).add_(1)
    return torch.stack([x.sum(), (x * w).sum(), x.abs().sum()])


def merge_across_ranks(out: Tensor, lse: Tensor, group: Group, world: int,
                       how: str = "allgather", check: Tensor | None = None,
                       bounded: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """Exact merge of per-rank partials out [B, Hq, D], lse [B, Hq] (fp32): one all-gather,
    or two all-reduces (max of lse, then the weighted sums). Nothing is read on the host.

    `check` (a `digest`) rides the same collective (the all-gather, or the max all-reduce as
    [d, -d]); the third result is a device flag: True where the ranks' digests differ by
    more than rounding (1e-6 of the magnitude). `bounded=False`: plain collectives, no
    host wait on the CPU either (`gather_rows`), as a graph holds them."""
    if how not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {how!r}")
    if world == 1:
        return out, lse, None
    b, h, d = out.shape
    n = b * h * d
    if how == "allgather":
        extra = [] if check is None else [check]
        packed = torch.cat([out.flatten().double(), lse.flatten().double(), *extra])
        rows = gather_rows(packed, group, world, op="decode (merge)", bounded=bounded)
        outs = rows[:, :n].to(out.dtype).reshape(world, b, h, d)
        lses = rows[:, n:n + b * h].to(lse.dtype).reshape(world, b, h)
        flag = None
        if check is not None:
            got = rows[:, n + b * h:]
            flag = ((got[:, :2] - got[0, :2]).abs() > 1e-6 * got[:, 2:].amax() + 1e-30).any()
        return (*merge_weighted(outs, lses), flag)
    # The digest rides the max all-reduce as [d, -d]: max and min are exact at any world
    # size (moments are not: E[x^2] - E[x]^2 in fp32 cancels to noise at world 3).
    c = [] if check is None else [check.to(lse.dtype), -check.to(lse.dtype)]
    top = torch.cat([lse.flatten(), *c])
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    m = top[:b * h].reshape(b, h)
    flag = None
    if check is not None:
        hi, neg_lo = top[b * h:b * h + 3], top[b * h + 3:]
        flag = ((hi[:2] + neg_lo[:2]).abs() > 1e-6 * hi[2].abs() + 1e-30).any()
    safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - safe)  # this rank's weight, 0 where it saw nothing
    body = torch.cat([(out * w.unsqueeze(-1)).flatten(), w.flatten()])
    dist.all_reduce(body, group=group)
    tot = body[n:].reshape(b, h)
    o = body[:n].reshape(b, h, d) / tot.clamp_min(1e-30).unsqueeze(-1)
    return o, torch.where(tot > 0, safe + torch.log(tot.clamp_min(1e-30)), m), flag

def decode_step(cache: Parts, layer: int, q: Tensor, k: Tensor, v: Tensor,
                softmax_scale: float | None, softcap: float | None = None,
                sinks: Tensor | None = None) -> Tensor:
    """`ShardedKVCache.decode` (see there)."""
    c, b, idx = cache.config, cache.config.max_seqs, cache.index
    cap, drops = 0.0, None
    if isinstance(layer, int) and not isinstance(layer, bool):
        previous_check(cache, layer)
    try:
        layer = check_index("layer", layer, c.num_layers)
        check_tensor("q", q, c, c.q_heads, 1)
        check_tensor("k", k, c, c.kv_heads, 1)
        check_tensor("v", v, c, c.kv_heads, 1)
        if q.shape[0] != b or k.shape[0] != b or v.shape[0] != b:
            raise ValueError(f"decode takes all {b} sequences (batch {b}), got q.shape "
                             f"{tuple(q.shape)}, k.shape {tuple(k.shape)}")
        scale = check_scale(softmax_scale, c.head_dim)
        cap = check_extras(q, sinks, softcap)
        if c.check_finite:  # before anything moves: the error rides check_step's row
            check_finite(f"decode (layer {layer})", k, v)
        if cache.windows.windowed(layer):  # the token leaving the window, per sequence
            drops = [cache.windows.drops(layer, s, idx.seen[layer][s] + 1 - c.window(layer))
                     for s in range(b)]
        # demoted pages: flush, rank by bound, fetch (errors ride the merge below)
        recalled = None if cache.tiers is None else cache.tiers.prepare(layer, q, scale)
        # host pages attended where they live (TierPolicy attend="host" / "auto")
        hosted = None if cache.tiers is None else cache.tiers.host_parts(layer, q[:, 0],
                                                                          scale, cap)
        error = None
    except Exception as e:  # noqa: BLE001 (any type: raised on every rank below)
        error = e
    if error is None:
        owners = idx.place_decode(layer, drops)
        short, full = room(cache, layer, owners, drops)
        # a windowed layer is never scored: no per-key scores to keep
        wants = (cache.eviction is not None and cache.eviction.wants_logits
                 and not cache.windows.windowed(layer))
        logits: list[list[Tensor] | None] = [[] if wants else None for _ in range(b)]
        parts = [local_partial(cache, layer, s, q[s, 0], scale, logits[s], cap)
                 for s in range(b)]
        if recalled is not None:
            parts = [recall(p, page, q[s, 0], scale, cap) for s, (p, page)
                     in enumerate(zip(parts, recalled))]
            parts = [p if h is None else merge([p, h]) for p, h in zip(parts, hosted)]
        lengths = [*idx.seen[layer], *(idx.held(layer, s) for s in range(b))]
    else:
        owners, full, logits, short = [], None, [], 0
        parts = [empty((c.q_heads,), c.head_dim, c.dtype, cache.device)] * b
        lengths = [-1] * 2 * b
    check_step(cache, layer, lengths, short, full, error, scale if error is None else 0.0)
    merged = cross_rank(cache, layer, parts,
                        digest(q, k, v) if cache.world > 1 else None)
    total, l_new = own_token(merged, q, k, v, scale, cap)
    if sinks is not None:  # one more term in the denominator
        total = with_sink(total, sinks)
    if drops is not None:  # attended: now the oldest token leaves the window
        for s in range(b):
            evict(cache, layer, s, drops[s])
    store = bind(store_token, cache, layer, k, v, owners)
    if cache.eviction is not None:
        cache.eviction.on_decode(layer, DecodeStep(q[:, 0], total.lse, l_new, logits,
                                                   list(idx.seen[layer]), owners, scale),
                                 store)
    else:
        for s in range(b):
            store(s, None)
    return total.out.unsqueeze(1).to(q.dtype)


def local_partial(cache: Parts, layer: int, seq: int, q: Tensor, scale: float,
                  logits: list[Tensor] | None, softcap: float = 0.0) -> Partial:
    """q [Hq, D] against this rank's hot pages of (layer, seq)."""
    store = cache.stores[layer]
    runs = store.runs(seq)
    # per-key scores, per-head tokens, capped scores: the torch pass and the CPU kernel
    # have them all
    if logits is not None or not store.uniform(seq) or softcap:
        dec = cache.decoder
        if dec.name not in ("torch", "cpu"):
            dec = get_backend("torch", q.device, q.dtype, q.shape[-1])
        hr = None if store.uniform(seq) else store.head_runs(seq)
        return dec.decode(q, store.k, store.v, runs, scale,  # type: ignore[call-arg]
                          head_runs=hr, logits=logits, softcap=softcap)
    return cache.decoder.decode(q, store.k, store.v, runs, scale)


def recall(part: Partial, page: Gathered | None, q: Tensor, scale: float,
           softcap: float = 0.0) -> Partial:
    """Merge the exact partial over pending + recalled demoted entries into `part`."""
    if page is None:
        return part
    return merge([part, attend(q, page.k, page.v, scale, valid=page.pos >= 0,
                               softcap=softcap)])


def room(cache: Parts, layer: int, owners: list[int],
         drops: list[list[int]] | None) -> tuple[int, str | None]:
    """(pages this rank lacks to store the step's tokens it owns, after a window's drops;
    the error to raise): from its own store, so pages shared between sequences count once."""
    st, need = cache.stores[layer], 0
    for s, owner in enumerate(owners):
        drop = drops[s][cache.rank] if drops is not None else 0
        add = int(owner == cache.rank) and cache.config.window(layer) != 0
        need += st.pages_to_grow(s, drop, add)
    short = max(0, need - st.free_pages)
    if not short:
        return 0, None
    return short, (f"KV cache capacity exceeded: layer {layer} needs {need} new page(s) on "
                   f"rank {cache.rank}, which has {st.free_pages} of {st.num_pages} free "
                   f"(capacity {cache.config.capacity} tokens per rank)")


def check_step(cache: Parts, layer: int, lengths: list[int], short: int,
               full: str | None, error: BaseException | None, scale: float) -> None:
    """Raise on every rank if any rank failed, the ranks disagree on the step (layer, the
    softmax scale, each sequence's next position and cached length) or a rank lacks pages
    (`short`, from its own store). One `agree` row on the CPU control group, before the
    device merge, never reading the GPU; it carries the operation's name, so a rank in
    another operation fails fast."""
    from .prefill import ROOM
    agree("decode", cache.group, error,
          max_words=max(CAPACITY, 10 + 4 * len(lengths)),  # the same on every rank
          **{"layer": layer if error is None else -1, "softmax_scale": scale,
             "next positions, then cached lengths": tuple(lengths), "pages short": short},
          explain={"pages short": ROOM})
    if full is not None:  # short alike on every rank (else agree raised)
        raise ValueError(full)


def cross_rank(cache: Parts, layer: int, parts: list[Partial],
               check: Tensor | None) -> Partial:
    """The step's one device collective: every rank's partials [B, Hq, D] merged exactly,
    with the digest of q/k/v riding along (every rank must decode the same token). On the
    CPU the flag is read at once; on a GPU it is read at the layer's next step (the host
    then waits only for an event one step old), so both raise on every rank alike."""
    out = torch.stack([p.out for p in parts])
    lse = torch.stack([p.lse for p in parts])
    o, l, flag = merge_across_ranks(out, lse, cache.group, cache.world, cache.config.merge,
                                    check)
    if flag is not None:
        if flag.device.type == "cpu":
            raise_if_differ(layer, flag)
        else:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            cache.pending_checks[layer] = (host, event)
    return Partial(o, l)


def differ_error(layer: int, when: str = "this") -> ValueError:
    return ValueError(f"decode: the ranks passed different q/k/v to layer {layer} at {when} "
                      f"step (every rank must decode the same token: run the same model on "
                      f"the same input on every rank)")


def raise_if_differ(layer: int, flag: Tensor, when: str = "this") -> None:
    if bool(flag):
        raise differ_error(layer, when)


def previous_check(cache: Parts, layer: int) -> None:
    """The GPU flag of the layer's previous step (see `cross_rank`)."""
    pending = cache.pending_checks.pop(layer, None)
    if pending is not None:
        pending[1].synchronize()
        raise_if_differ(layer, pending[0], "the previous")

def own_token(merged: Partial, q: Tensor, k: Tensor, v: Tensor, scale: float,
              softcap: float = 0.0) -> tuple[Partial, Tensor]:
    """The new token's own term (identical on every rank) merged in; returns the total
    and the new token's scaled scores l_new [B, Hq]."""
    acc = merged.out.dtype
    groups = q.shape[2] // k.shape[2]
    kn = k[:, 0].to(acc).repeat_interleave(groups, 1)
    vn = v[:, 0].to(acc).repeat_interleave(groups, 1)
    l_new = (q[:, 0].to(acc) * scale * kn).sum(-1)
    if softcap:
        l_new = torch.tanh(l_new / softcap) * softcap
    return merge([merged, Partial(vn, l_new)]), l_new


def store_token(cache: Parts, layer: int, k: Tensor, v: Tensor, owners: list[int],
                seq: int, init: Tensor | None) -> None:
    """The owner stores seq's new token (initial scores `init` [1, Hkv]); every rank
    counts it."""
    pos = cache.index.seen[layer][seq]
    if cache.config.window(layer) == 0:  # no later query sees this token: never stored
        cache.index.advance(layer, seq, 1)
        return
    if cache.windows.windowed(layer):
        cache.windows.add(layer, seq, owners[seq], [pos])
    if owners[seq] == cache.rank:  # a fill, not a host->device copy (no sync)
        cache.stores[layer].append(seq, k[seq], v[seq],
                                   torch.full((1,), pos, dtype=torch.int64, device=k.device),
                                   init)
    cache.index.add(layer, seq, owners[seq], 1)
    cache.index.advance(layer, seq, 1)
