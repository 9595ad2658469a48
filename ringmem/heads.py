"""How a Ulysses group splits attention heads (pure; shared by the engine and `plan`)."""
from __future__ import annotations

from functools import lru_cache


def heads_error(hq: int, hkv: int, degree: int) -> str | None:
    """Why `degree` ranks cannot split hq query heads (hkv key/value heads), or None."""
    if degree < 1:
        return f"the Ulysses degree must be >= 1, got {degree}"
    if hq % degree:
        return (f"the Ulysses degree {degree} must divide the number of query heads "
                f"(q.shape[2]={hq}): each rank computes an equal share of whole heads")
    return None


@lru_cache(maxsize=256)
def kv_heads(hq: int, hkv: int, degree: int) -> tuple[tuple[int, ...], ...]:
    """For each Ulysses rank, the global K/V heads it receives, in local order.

    Rank i computes query heads [i*hq/degree, (i+1)*hq/degree); query head h reads K/V head
    h // (hq/hkv). A rank receives each K/V head its query heads read once when its local
    heads keep GQA's uniform grouping, else one K/V head per local query head (a K/V head
    shared by two ranks is sent to both: replicated only as far as needed, never to all
    hq heads)."""
    err = heads_error(hq, hkv, degree)
    if err:
        raise ValueError(err)
    hl, group = hq // degree, hq // hkv
    out = []
    for i in range(degree):
        reads = [(i * hl + t) // group for t in range(hl)]
        need = sorted(set(reads))
        per = hl // len(need)
        uniform = hl % len(need) == 0 and all(
            reads[t] - need[0] == t // per for t in range(hl))
        out.append(tuple(need) if uniform else tuple(reads))
    return tuple(out)
