"""Greedy decoding with the LM head split over the ranks (`hf_vocab`): the global argmax
of the whole head, ties to the lowest token id, slices of uneven size, the model's own
head restored even after an error."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ringmem.integrations.hf_vocab import greedy, split_head, vocab_slice
from ringmem.testing import spawn

V, H = 10, 6


class _Model(nn.Module):  # the two accessors split_head uses, as transformers models have
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lm_head = nn.Linear(H, V, bias=True)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, m: nn.Module) -> None:
        self.lm_head = m


def test_vocab_slices_cover_the_vocabulary_once() -> None:
    for world in range(1, 6):
        got = [vocab_slice(V, r, world) for r in range(world)]
        assert got[0][0] == 0 and got[-1][1] == V
        assert all(a[1] == b[0] for a, b in zip(got, got[1:]))


def _split(rank: int, world: int) -> None:
    model = _Model()
    head = model.lm_head
    h = torch.randn(5, H, generator=torch.Generator().manual_seed(1))
    full = head(h).detach()
    with torch.no_grad(), split_head(model) as lo:
        part = model.lm_head(h)
        assert model.lm_head is not head and model.lm_head.weight.data_ptr() == \
            head.weight[lo:].data_ptr()  # a view: nothing copied
    assert model.lm_head is head
    a, b = vocab_slice(V, rank, world)
    assert lo == a and torch.equal(part, full[:, a:b])
    assert torch.equal(greedy(part, lo), full.argmax(-1))
    # ties across slices: the lowest id wins, as torch.argmax
    tied = torch.zeros(3, V)
    tied[0, [1, V - 1]] = 5.0
    tied[1, :] = -1.0
    tied[2, [V - 2, V - 1]] = 2.0
    assert torch.equal(greedy(tied[:, a:b], a), tied.argmax(-1))
    with pytest.raises(RuntimeError, match="boom"), split_head(model):
        raise RuntimeError("boom")
    assert model.lm_head is head


@pytest.mark.parametrize("world", [1, 2, 3])
def test_split_head_greedy_equals_the_whole_head(world: int) -> None:
    spawn(_split, world)


def test_split_head_refuses_a_head_it_cannot_slice() -> None:
    model = _Model()
    model.lm_head = nn.Sequential(nn.Linear(H, V))
    with pytest.raises(TypeError, match="torch.nn.Linear LM head, got Sequential"):
        with split_head(model):
            pass
