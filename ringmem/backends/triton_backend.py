"""Block backend on ringmem's own Triton kernels (`ringmem.kernels`), imported lazily.

Every mask piece runs natively: full, causal and window bands (lo <= j - i <= hi), and the
logit softcap. On CUDA the kernels compile; on CPU they run only under TRITON_INTERPRET=1
(tests), where bfloat16 is computed wrongly by the interpreter and is therefore refused.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from ..masking import as_mask
from ..partial import Partial, acc_dtype, empty
from .base import Backend, Mask, propagate_nonfinite


class TritonBackend(Backend):
    name = "triton"

    def unsupported(self, device: torch.device, dtype: torch.dtype, head_dim: int, *,
                    bands: bool = False, softcap: bool = False) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'ringmem[triton]')"
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"the Triton kernels take float32/float16/bfloat16, got {dtype}"
        if head_dim > 256:
            return f"head_dim must be <= 256, got {head_dim}"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            if dtype == torch.bfloat16:
                return "bfloat16 is computed wrongly by the Triton interpreter"
            return None
        return (f"Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU), got device "
                f"{device.type!r}")

    def fwd(self, q: Tensor, k: Tensor, v: Tensor, scale: float, causal: Mask, *,
            softcap: float = 0.0) -> tuple[Tensor, Tensor]:
        from ..kernels.attention import attention_fwd
        return propagate_nonfinite(q, *attention_fwd(q, k, v, scale, as_mask(causal),
                                                     softcap=softcap))

    def bwd(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
            scale: float, causal: Mask, *, softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        from ..kernels.backward import attention_bwd
        return attention_bwd(dout, q, k, v, out, lse, scale, as_mask(causal), softcap=softcap)

    def decode(self, q: Tensor, k: Tensor, v: Tensor, runs: Sequence[tuple[int, int]],
               scale: float) -> Partial:
        """Split-KV partial of one query against the runs of the pools, read in place (one
        launch over every run, then the fused merge)."""
        from ..kernels.decode import decode_runs
        if not runs:
            return empty(q.shape[:1], q.shape[-1], q.dtype, q.device)
        out, lse = decode_runs(q, k, v, runs, scale)
        ad = acc_dtype(q.dtype)
        return Partial(out.to(ad), lse.to(ad))
