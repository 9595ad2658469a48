"""PyTorch's fused flash-attention ops that return logsumexp.

CPU: `_scaled_dot_product_flash_attention_for_cpu` (+ backward): any float dtype, GQA native.
CUDA: `_scaled_dot_product_flash_attention` (+ backward): fp16/bf16, head_dim % 8 == 0 and
<= 256; K/V heads are expanded per block for GQA (inside the backend, after communication)
and their gradients summed back.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..masking import as_mask, band_bias, causal_flag
from .base import Backend, Mask, propagate_nonfinite

_aten = torch.ops.aten


def _t(x: Tensor) -> Tensor:
    return x.transpose(1, 2)  # [B, S, H, D] <-> [B, H, S, D], a view


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()  # the CUDA kernels need stride(-1) == 1


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _reduce_kv(dx: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return dx
    b, s, h, d = dx.shape
    return dx.reshape(b, s, h // groups, groups, d).sum(3, dtype=torch.float32)


def _cpu_mask(mask: Mask, q: Tensor):
    """(is_causal, k -> additive bias or None) for the CPU op: a band becomes an explicit
    bias in q's dtype (the op wants that dtype), -inf outside the band."""
    band = as_mask(mask)
    if band in ((None, None), (None, 0)):
        return band == (None, 0), lambda k: None

    def bias(k: Tensor) -> Tensor:
        return band_bias(band, q.shape[1], k.shape[1], q.dtype, q.device)
    return False, bias


class SdpaBackend(Backend):
    name = "sdpa"

    def unsupported(self, device: torch.device, dtype: torch.dtype, head_dim: int, *,
                    bands: bool = False, softcap: bool = False) -> str | None:
        if softcap:
            return "PyTorch's fused attention ops have no logit softcap"
        if bands and device.type != "cpu":
            return "the CUDA flash op takes no mask: window bands need another backend"
        if device.type == "cpu":
            return None if dtype.is_floating_point else f"dtype {dtype} is not a float dtype"
        if device.type == "cuda":
            if dtype not in (torch.float16, torch.bfloat16):
                return f"the CUDA flash op needs float16 or bfloat16, got {dtype}"
            if head_dim % 8 or head_dim > 256:
                return f"the CUDA flash op needs head_dim % 8 == 0 and <= 256, got {head_dim}"
            return None
        return f"no fused flash op for device type {device.type!r}"

    def fwd(self, q: Tensor, k: Tensor, v: Tensor, scale: float,
            causal: Mask) -> tuple[Tensor, Tensor]:
        return propagate_nonfinite(q, *self._fwd(q, k, v, scale, causal))

    def _fwd(self, q: Tensor, k: Tensor, v: Tensor, scale: float,
             causal: Mask) -> tuple[Tensor, Tensor]:
        if q.device.type == "cpu":
            causal, bias = _cpu_mask(causal, q)
            out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
                _t(q), _t(k), _t(v), 0.0, causal, attn_mask=bias(k), scale=scale)
            return _t(out), lse
        causal = causal_flag(causal, self.name)
        g = q.shape[2] // k.shape[2]
        q, k, v = (_unit_last(x) for x in (q, k, v))
        res = _aten._scaled_dot_product_flash_attention(
            _t(q), _t(_expand_kv(k, g)), _t(_expand_kv(v, g)), 0.0, causal, False, scale=scale)
        return _t(res[0]), res[1][..., : q.shape[1]]

    def bwd(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
            scale: float, causal: Mask) -> tuple[Tensor, Tensor, Tensor]:
        lse = lse.contiguous()
        if q.device.type == "cpu":
            causal, bias = _cpu_mask(causal, q)
            dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
                _t(dout), _t(q), _t(k), _t(v), _t(out), lse, 0.0, causal,
                attn_mask=bias(k), scale=scale)
            return _t(dq), _t(dk), _t(dv)
        causal = causal_flag(causal, self.name)
        g = q.shape[2] // k.shape[2]
        sq, sk = q.shape[1], k.shape[1]
        dout, q, k, v, out = (_unit_last(x) for x in (dout, q, k, v, out))
        # dense (non-varlen) call without dropout: cum_seq and philox tensors are unused
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            _t(dout), _t(q), _t(_expand_kv(k, g)), _t(_expand_kv(v, g)), _t(out), lse,
            None, None, sq, sk, 0.0, causal, None, None, scale=scale)
        return _t(dq), _reduce_kv(_t(dk), g), _reduce_kv(_t(dv), g)
