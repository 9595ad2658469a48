"""megatron-core: ring attention as the core attention of a GPT layer (lazy import).

Megatron shards a sequence over its context-parallel (CP) group itself, and ringmem's
layouts are the same shardings:

- plain batches ([s, b, h] activations): `get_batch_on_this_cp_rank` splits the sequence
  into 2*CP chunks and gives rank r chunks r and 2*CP-1-r (RoPE slices its table alike),
  which is ringmem's "zigzag" layout;
- packed batches (THD, `packed_seq_params.qkv_format == "thd"`): every sequence, padded to
  a multiple of 2*CP (`cu_seqlens_q_padded`), is split the same way per sequence
  (`thd_get_partitioned_indices`, THD RoPE), which is ringmem's "document" layout.

So each rank's Q/K/V go to `ring_attention` as they are (a transpose, no copy), over the CP
group Megatron gives the attention (`pg_collection.cp`):

    spec = ringmem_layer_spec(backend="auto")            # get_gpt_layer_local_spec + ring
    model = GPTModel(config=config, transformer_layer_spec=spec, ...)

megatron-core is imported by this module only, never by `import ringmem`. On a machine
without CUDA call `cpu_shim()` first (Megatron asks `torch.cuda.current_device()` for its
buffers and RoPE even when everything lives on the CPU).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..api import ring_attention
from ..comm import Group, group_rank_world
from ..config import check_ulysses
from ..options import check_schedule
from ..packing import chunks
from ..sharding import shard

_CP_COMM_TYPE = "p2p"  # Megatron's ring (None means the same); a2a / allgather would be a
# different algorithm, so asking for one is refused rather than silently run as a ring


def cpu_shim() -> None:
    """Let megatron-core 0.16 build and train on a machine without CUDA (tests, CPU runs).

    Two CUDA-only calls stand in its way: `torch.cuda.current_device()` (its buffers and
    RoPE ask for it even when everything lives on the CPU; here it answers "cpu"), and the
    RoPE table's context-parallel slice, which builds its index in pinned memory and moves it
    with `.cuda()` (replaced by ringmem's zigzag `shard` of the table, the same selection:
    chunks r and 2*CP-1-r). No-op where CUDA exists. Called explicitly, never at import, as
    it replaces functions for the whole process.
    """
    if torch.cuda.is_available():
        return
    import importlib

    torch.cuda.current_device = lambda: "cpu"

    def pos_emb_on_this_cp_rank(pos_emb: Tensor, seq_dim: int, cp_group: Group) -> Tensor:
        if cp_group is None:
            raise ValueError("cp_group must be given to slice the RoPE table per CP rank")
        return shard(pos_emb, dim=seq_dim, group=cp_group, layout="zigzag")

    for name in ("rope_utils", "rotary_pos_embedding", "yarn_rotary_pos_embedding"):
        module = importlib.import_module(f"megatron.core.models.common.embeddings.{name}")
        if hasattr(module, "get_pos_emb_on_this_cp_rank"):
            module.get_pos_emb_on_this_cp_rank = pos_emb_on_this_cp_rank


def _mask_types() -> tuple[Any, Any, Any]:
    """(causal, full, padded) mask types. Self-attention has as many keys as queries, so
    bottom-right causal is causal; padding is expressible only as packed sequences."""
    from megatron.core.transformer.enums import AttnMaskType

    causal = (AttnMaskType.causal, AttnMaskType.causal_bottom_right, AttnMaskType.padding_causal)
    full = (AttnMaskType.no_mask, AttnMaskType.padding)
    return causal, full, (AttnMaskType.padding, AttnMaskType.padding_causal)


def _default_cp_group() -> Group:
    """Megatron's global CP group (when no pg_collection is given), or None on one process."""
    from megatron.core import parallel_state

    group = parallel_state.get_context_parallel_group(check_initialized=False)
    if group is None and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("RingmemCoreAttention needs a context-parallel group: pass "
                         "pg_collection (with .cp) or call megatron.core.parallel_state."
                         "initialize_model_parallel first")
    return group


class RingmemCoreAttention(torch.nn.Module):
    """Megatron core attention (`SelfAttentionSubmodules.core_attention`) running ringmem's
    exact ring attention over the context-parallel group.

    Built by Megatron as `(config, layer_number, attn_mask_type, attention_type,
    cp_comm_type=None, softmax_scale=None, pg_collection=None)`; `schedule`, `ulysses`,
    `backend` and `interconnect` are ringmem's (bind them with `with_options` or
    `ringmem_layer_spec`). `ulysses` (an int or "auto") splits the CP group into Ulysses
    groups of that many ranks around the ring; it must divide CP and the local query heads.
    Supports causal and unmasked self-attention, GQA, `softmax_scale`, sliding windows
    (`config.window_size`, `window_attn_skip_freq`), `softmax_type` "off-by-one" and
    "learnable" (ringmem's sinks) and packed THD batches. Refuses, by name: attention
    dropout, attention_bias, cross attention, cp_comm_type other than "p2p", arbitrary masks.
    """

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any,
                 attention_type: str, cp_comm_type: str | None = None,
                 softmax_scale: float | None = None, pg_collection: Any = None, *,
                 schedule: str = "auto", backend: str = "auto",
                 interconnect: Any = None, ulysses: int | str = 1) -> None:
        super().__init__()
        from megatron.core.transformer.utils import is_layer_window_attention

        if attention_type != "self":
            raise ValueError(f"RingmemCoreAttention supports self-attention only, got "
                             f"attention_type={attention_type!r}")
        if config.attention_dropout:
            raise ValueError(f"RingmemCoreAttention has no attention dropout: set "
                             f"TransformerConfig(attention_dropout=0.0), got "
                             f"{config.attention_dropout}")
        if cp_comm_type not in (None, _CP_COMM_TYPE):
            raise ValueError(f"RingmemCoreAttention runs a ring (cp_comm_type 'p2p'), got "
                             f"cp_comm_type={cp_comm_type!r}")
        check_schedule(schedule, "RingmemCoreAttention: schedule")
        self.ulysses = check_ulysses(ulysses)
        self._check_mask_type(attn_mask_type)
        self.config, self.layer_number = config, max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.schedule, self.backend, self.interconnect = schedule, backend, interconnect
        if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
            self.cp_group: Group = pg_collection.cp
        else:
            self.cp_group = _default_cp_group()
        # Megatron's default; apply_query_key_layer_scaling divides the scale by the layer
        # number and its softmax multiplies it back, so the net scale is this one
        self.softmax_scale = (1.0 / math.sqrt(config.kv_channels) if softmax_scale is None
                              else float(softmax_scale))
        windowed = is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                             self.layer_number)
        self.window = tuple(config.window_size) if windowed else (-1, -1)
        self._init_sinks(config, pg_collection)

    @classmethod
    def with_options(cls, *, schedule: str = "auto", backend: str = "auto",
                     interconnect: Any = None, ulysses: int | str = 1) -> Any:
        """This class with ringmem's options bound, to put in a layer spec (Megatron calls
        `core_attention(...)` with its own arguments only)."""
        return functools.partial(cls, schedule=schedule, backend=backend,
                                 interconnect=interconnect, ulysses=ulysses)

    @staticmethod
    def _check_mask_type(mask_type: Any, packed: bool | None = None) -> bool:
        """True if causal; ValueError for masks ringmem cannot express (packed None: not
        known yet, at construction)."""
        causal, full, padded = _mask_types()
        if mask_type not in causal and mask_type not in full:
            raise ValueError(f"RingmemCoreAttention supports causal, padding_causal, no_mask "
                             f"and padding mask types (padding as packed sequences), got "
                             f"{mask_type}")
        if packed is False and mask_type in padded:
            raise ValueError(f"RingmemCoreAttention: mask type {mask_type} needs packed "
                             f"sequences (packed_seq_params, qkv_format 'thd'); padding masks "
                             f"as tensors are not read")
        return mask_type in causal

    def _init_sinks(self, config: Any, pg_collection: Any) -> None:
        """softmax_type: "off-by-one" is a zero sink logit per head, "learnable" a trained
        one (Megatron's softmax_offset), both ringmem sinks."""
        kind = getattr(config, "softmax_type", "vanilla")
        self.softmax_offset: Tensor | None = None
        if kind == "vanilla":
            return
        if kind not in ("off-by-one", "learnable"):
            raise ValueError(f"RingmemCoreAttention: unsupported softmax_type {kind!r}")
        if pg_collection is not None and getattr(pg_collection, "tp", None) is not None:
            tp = pg_collection.tp.size()
        else:
            from megatron.core import parallel_state
            tp = parallel_state.get_tensor_model_parallel_world_size()
        heads = config.num_attention_heads // tp
        device = ("cpu" if config.use_cpu_initialization or not torch.cuda.is_available()
                  else torch.cuda.current_device())
        zeros = torch.zeros(heads, device=device, dtype=config.params_dtype)
        if kind == "off-by-one":
            self.register_buffer("softmax_offset", zeros, persistent=False)
        else:
            self.softmax_offset = torch.nn.Parameter(zeros)
            if config.perform_initialization:
                config.init_method(self.softmax_offset)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: Any = None, attention_bias: Tensor | None = None,
                packed_seq_params: Any = None) -> Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] (THD: [t, np, hn] and
        [t, ng, hn]), this CP rank's tokens -> [sq, b, np * hn] (THD: [t, np * hn]).

        `attention_mask` is not read, as in Megatron's TE attention: the mask is the mask
        type plus, for packed batches, the sequences of `packed_seq_params`."""
        if attention_bias is not None:
            raise ValueError("RingmemCoreAttention does not support attention_bias")
        group = self.cp_group
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed_seq_params is not None and not thd:
            raise ValueError(f"RingmemCoreAttention: packed_seq_params.qkv_format must be "
                             f"'thd', got {packed_seq_params.qkv_format!r}")
        causal = self._check_mask_type(attn_mask_type if attn_mask_type is not None
                                       else self.attn_mask_type, thd)
        if thd:
            group = _packed_group(packed_seq_params, group)
        if query.shape[0] != key.shape[0]:
            raise ValueError(f"RingmemCoreAttention is for training and prefill: query and key "
                             f"must hold the same tokens, got {query.shape[0]} and "
                             f"{key.shape[0]} (KV-cache inference is not supported)")
        kwargs = dict(causal=causal, group=group, schedule=self.schedule,
                      ulysses=self.ulysses, backend=self.backend,
                      softmax_scale=self.softmax_scale, interconnect=self.interconnect,
                      window=self.window, sinks=self.softmax_offset)
        if thd:  # [t, h, d] -> [1, t, h, d]: a view
            cu = thd_cu_seqlens(packed_seq_params, query.shape[0], group_rank_world(group)[1],
                                causal)
            out = ring_attention(query[None], key[None], value[None], layout="document",
                                 cu_seqlens=cu, **kwargs)
            return out[0].flatten(1)
        # [s, b, h, d] -> [b, s, h, d]: a strided view, no copy (ringmem takes any strides)
        out = ring_attention(query.transpose(0, 1), key.transpose(0, 1),
                             value.transpose(0, 1), layout="zigzag", **kwargs)
        return out.transpose(0, 1).reshape(query.shape[0], query.shape[1], -1)


def _packed_group(params: Any, group: Group) -> Group:
    """Megatron's dynamic CP: a per-batch group in packed_seq_params wins."""
    if getattr(params, "cp_group", None) is not None:
        return params.cp_group
    local = getattr(params, "local_cp_size", None)
    if local is not None and local != group_rank_world(group)[1]:
        raise ValueError(f"RingmemCoreAttention: packed_seq_params.local_cp_size={local} "
                         f"without a cp_group is not supported")
    return group


def _offsets(x: Any, name: str) -> list[int] | None:
    if x is None:
        return None
    values = [int(v) for v in (x.tolist() if isinstance(x, Tensor) else x)]
    if len(values) < 2 or values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"packed_seq_params.{name} must be offsets [0, ..., T], got {values}")
    return values


def thd_cu_seqlens(params: Any, local_tokens: int, world: int, causal: bool) -> list[int]:
    """The `cu_seqlens` that make ringmem's "document" layout place every token where
    Megatron's THD CP split puts it (each padded sequence in 2*CP chunks, rank r holding
    chunks r and 2*CP-1-r of each), for `local_tokens` tokens per rank.

    With the real lengths when Megatron's padding is ringmem's own (each sequence padded to
    the next multiple of 2*CP: pads then see nothing and are seen by nobody); else, when
    causal, with the padded lengths (pads sit at the end of their sequence, so no real
    token sees one). Anything else cannot be mapped exactly: ValueError.
    """
    real = _offsets(params.cu_seqlens_q, "cu_seqlens_q")
    if real is None:
        raise ValueError("packed_seq_params (thd) needs cu_seqlens_q")
    padded = _offsets(params.cu_seqlens_q_padded, "cu_seqlens_q_padded")
    for name, kv, q in (("cu_seqlens_kv", params.cu_seqlens_kv, real),
                        ("cu_seqlens_kv_padded", params.cu_seqlens_kv_padded, padded)):
        kv = _offsets(kv, name)
        if kv is not None and kv != q:
            raise ValueError(f"RingmemCoreAttention is self-attention: packed_seq_params."
                             f"{name} {kv} must equal its query offsets {q}")
    padded = padded if padded is not None else real
    lens = [b - a for a, b in zip(real, real[1:])]
    plens = [b - a for a, b in zip(padded, padded[1:])]
    if len(lens) != len(plens) or any(p < n for n, p in zip(lens, plens)):
        raise ValueError(f"packed_seq_params: cu_seqlens_q_padded {padded} does not pad "
                         f"cu_seqlens_q {real} sequence by sequence")
    if padded[-1] != local_tokens * world:
        raise ValueError(f"packed_seq_params: the padded sequences hold {padded[-1]} tokens but "
                         f"the {world} CP ranks hold {local_tokens} each ({local_tokens * world})")
    c = chunks(world)
    bad = [p for p in plens if p % c]
    if bad:
        raise ValueError(f"packed_seq_params: with context parallel size {world} every padded "
                         f"sequence length must be a multiple of {c} (2*CP), got {bad} (pad "
                         f"them: cu_seqlens_q_padded)")
    if all(p == -(-n // c) * c for n, p in zip(lens, plens)):
        return real
    if causal:
        return padded
    raise ValueError(f"packed_seq_params: padding {plens} beyond the next multiple of {c} "
                     f"(2*CP) of the lengths {lens} cannot be hidden from non-causal attention")


def ringmem_layer_spec(*, schedule: str = "auto", backend: str = "auto",
                       interconnect: Any = None, ulysses: int | str = 1,
                       **local_spec_kwargs: Any) -> Any:
    """`get_gpt_layer_local_spec(**local_spec_kwargs)` with `RingmemCoreAttention` as the core
    attention (ringmem's schedule / backend / interconnect / ulysses bound). Returns a
    ModuleSpec for `GPTModel(transformer_layer_spec=...)`."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if local_spec_kwargs.get("multi_latent_attention"):
        raise ValueError("ringmem_layer_spec: multi_latent_attention is not supported (its "
                         "keys and values have different head dims)")
    spec = get_gpt_layer_local_spec(**local_spec_kwargs)
    spec.submodules.self_attention.submodules.core_attention = RingmemCoreAttention.with_options(
        schedule=schedule, backend=backend, interconnect=interconnect, ulysses=ulysses)
    return spec
