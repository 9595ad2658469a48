"""What a transformers attention call asks for beyond plain causal attention: the layer's
sliding window, GPT-OSS sinks, Gemma 2 softcap, and packed documents.

transformers passes them to the attention function as keywords (checked in 5.24):
`sliding_window` (Mistral, Qwen2, Gemma 2/3, GPT-OSS; None on full-attention layers),
`s_aux` (GPT-OSS: the per-head sink logits), `softcap` (Gemma 2). Its masks define a window
of W as "key j is seen from query i iff i - W < j <= i", so ringmem's left window (flash-
attn's window_size[0]) is W - 1. Which layers slide comes from the config:
`config.layer_types` (transformers 5), else `sliding_window_pattern`, else every layer when
`sliding_window` is set (Mistral).

Packed batches: transformers' packing collators give position ids that restart at each
document and no attention mask; the model's own masks then keep documents apart. On the
ring path each rank holds a shard of those ids, so the documents' offsets (`cu_seqlens`,
the same on every rank) come from the gathered ids, once per forward; a caller that has
them (`cu_seq_lens_q`, as the flattening collator returns) passes them through the model
call and nothing is gathered.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..comm import Group
from ..sharding import packing_of_positions


def window_left(sliding_window: object, where: str = "sliding_window") -> int:
    """transformers' sliding window W (None: full attention) as ringmem's left size."""
    if sliding_window is None:
        return -1
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) \
            or sliding_window < 1:
        raise ValueError(f"{where} must be a positive int or None, got {sliding_window!r}")
    return sliding_window - 1


def call_options(module: Any, kwargs: dict[str, Any]
                 ) -> tuple[int, Tensor | None, float | None]:
    """The extras of one attention call, from transformers' keywords (or the module):
    (left window, -1: none; sinks [Hq] or None; softcap or None)."""
    # the layer's name only when raising: under torch.compile of several layers its index
    # is a symbolic int, which a format string would turn into a graph break
    where = lambda: f"layer {getattr(module, 'layer_idx', '?')}"  # noqa: E731
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    sinks = kwargs.get("s_aux")
    if sinks is not None and not isinstance(sinks, Tensor):
        raise ValueError(f"{where()}: s_aux (sinks) must be a tensor [Hq], got "
                         f"{type(sinks).__name__}")
    softcap = kwargs.get("softcap")
    if softcap is not None and (isinstance(softcap, bool)
                                or not isinstance(softcap, (int, float)) or softcap <= 0):
        raise ValueError(f"{where()}: softcap must be a positive number or None, got "
                         f"{softcap!r}")
    try:
        left = window_left(window)
    except ValueError as e:
        raise ValueError(f"{where()}: {e}") from None
    return left, sinks, None if softcap is None else float(softcap)


def layer_windows(config: Any) -> list[int]:
    """Each layer's left window (-1: full attention) from a transformers config."""
    n = config.num_hidden_layers
    w = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        bad = sorted(set(types) - {"full_attention", "sliding_attention"})
        if bad:
            raise ValueError(f"config.layer_types has {bad}: ringmem takes full_attention and "
                             f"sliding_attention layers")
        if len(types) != n:
            raise ValueError(f"config.layer_types has {len(types)} entries for "
                             f"num_hidden_layers={n}")
        left = window_left(w, "config.sliding_window") if "sliding_attention" in types else -1
        return [left if t == "sliding_attention" else -1 for t in types]
    if w is None or not getattr(config, "use_sliding_window", True):
        return [-1] * n
    left = window_left(w, "config.sliding_window")
    pattern = getattr(config, "sliding_window_pattern", None)
    if pattern:  # every pattern-th layer is global
        return [left if (i + 1) % pattern else -1 for i in range(n)]
    return [left] * n


class PackingReader:
    """The documents of the current forward, read once (every layer gets the same ids)."""

    def __init__(self) -> None:
        self._last: tuple[Tensor, int, object] | None = None  # (ids, version, packing)

    def __call__(self, kwargs: dict[str, Any], attention_mask: Tensor | None,
                 group: Group, layout: str) -> object:
        """cu_seqlens for `ring_attention` (None: no packing). A collective when it reads
        the position ids (every rank runs the same layers)."""
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None:
            other = kwargs.get("cu_seq_lens_k")
            if other is not None and not torch.equal(torch.as_tensor(other).cpu(),
                                                     torch.as_tensor(cu).cpu()):
                raise ValueError("ring attention is self-attention: cu_seq_lens_k must equal "
                                 "cu_seq_lens_q")
            if attention_mask is not None:
                raise ValueError("cu_seq_lens_q (packed documents) and a padding mask "
                                 "together are ambiguous: pass one of them")
            return cu
        if layout == "document":
            raise ValueError("layout 'document' needs the packed documents: pass "
                             "cu_seq_lens_q=<the global cu_seqlens> to the model call")
        ids = kwargs.get("position_ids")
        if attention_mask is not None or ids is None:
            return None  # transformers reads packing only without a mask
        last = self._last
        if last is not None and last[0] is ids and last[1] == ids._version:
            return last[2]
        packing = packing_of_positions(ids, group=group, layout=layout)
        self._last = (ids, ids._version, packing)
        return packing
