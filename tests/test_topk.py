"""Exact global top-k across ranks (the eviction coordinator) vs a single-process top-k."""
from __future__ import annotations

import pytest
import torch

from ringmem.eviction import global_topk_mask
from ringmem.eviction.topk import ordered_keys
from ringmem.testing import spawn


def _reference(scores: torch.Tensor, positions: torch.Tensor, k: int) -> set[int]:
    """Top-k by (score desc, position asc) over everything, as positions."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), int(positions[i])))
    return {int(positions[i]) for i in order[:k]}


def _case(rank: int, world: int, n: int, k: int, ties: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randint(-3, 4, (n,), generator=g).float() if ties
              else torch.randn(n, generator=g))
    scores[torch.randperm(n, generator=g)[:3]] = float("inf")  # protected: always kept
    positions = torch.randperm(10 * n, generator=g)[:n]         # distinct, any order
    # uneven shards: rank r takes a contiguous slice of a random split
    cuts = sorted(torch.randperm(n - 1, generator=g)[:world - 1].add(1).tolist())
    bounds = [0] + cuts + [n]
    lo, hi = bounds[rank], bounds[rank + 1]
    keep = global_topk_mask(scores[lo:hi], positions[lo:hi], k)
    got = set(positions[lo:hi][keep].tolist())
    want = _reference(scores, positions, k) & set(positions[lo:hi].tolist())
    assert got == want, (rank, sorted(got ^ want))


def _all_cases(rank: int, world: int) -> None:
    for n, k, ties, seed in [(200, 37, True, 1), (200, 37, False, 2), (150, 3, True, 3),
                             (150, 149, True, 4), (150, 150, False, 5), (64, 0, True, 6),
                             (300, 120, True, 7), (90, 5, False, 8)]:
        _case(rank, world, n, k, ties, seed)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_kept_set_equals_single_process_topk(world: int) -> None:
    spawn(_all_cases, world, timeout=120)


def test_ordered_keys_preserve_order() -> None:
    x = torch.tensor([float("-inf"), -3.5, -0.0, 0.0, 1e-30, 2.0, 3e38, float("inf")])
    keys = ordered_keys(x)
    assert torch.all(keys[1:] >= keys[:-1]) and keys.min() >= 0 and keys.max() < 2**32
    assert keys[2] == keys[3]  # -0.0 == 0.0
    with pytest.raises(ValueError, match="NaN"):
        ordered_keys(torch.tensor([1.0, float("nan")]))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="same length"):
        global_topk_mask(torch.zeros(3), torch.arange(4), 1)
    with pytest.raises(ValueError, match="k must be a non-negative int"):
        global_topk_mask(torch.zeros(3), torch.arange(3), -1)
