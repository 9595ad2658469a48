"""CPU backend: decode by the compiled kernel (`kernels/cpu_ext.py`), blocks by PyTorch's
fused flash op.

Decode reads each KV head's runs of pages in place, the G query rows of a head together,
so K and V stream once at close to the memory bandwidth; per-head runs (heads holding
different tokens), a logit softcap and per-key logits (H2O, TOVA, A2SF) all stay on the
kernel. The kernel is built on first use; where it cannot be (no compiler), or for float64
or non-finite queries, decode takes the torch path (`partial.attend`), as before.
Prefill blocks keep SDPA's CPU flash op (the torch backend's where a softcap is asked).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..partial import Partial, attend
from .base import Backend, Mask
from .sdpa import SdpaBackend
from .torch_ref import TorchBackend

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TILE = 1024
"""Keys per task: tiles of one head's runs are scored, softmaxed and summed by one thread
while they sit in its cache, then merged by lse."""


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self) -> None:
        self._sdpa, self._torch = SdpaBackend(), TorchBackend()
        self._ext: Any = None
        self._tried = False

    def __getstate__(self) -> dict:
        # the built module cannot be pickled (a cache sent to spawned ranks holds its
        # decoder): a copy loads it again on first use
        return {**self.__dict__, "_ext": None, "_tried": False}

    def kernel(self) -> Any | None:
        """The built extension, or None where it cannot be built (logged once)."""
        if not self._tried:
            self._tried = True
            from ..kernels.cpu_ext import load
            self._ext = load()
        return self._ext

    def unsupported(self, device: torch.device, dtype: torch.dtype, head_dim: int, *,
                    bands: bool = False, softcap: bool = False) -> str | None:
        if device.type != "cpu":
            return f"the compiled CPU kernel runs on the CPU, not {device.type}"
        if dtype not in DTYPES:
            return f"the compiled CPU kernel takes {DTYPES}, got {dtype}"
        return None

    def _block(self, softcap: float) -> Backend:
        return self._torch if softcap else self._sdpa

    def fwd(self, q: Tensor, k: Tensor, v: Tensor, scale: float, causal: Mask, *,
            softcap: float = 0.0) -> tuple[Tensor, Tensor]:
        if softcap:
            return self._torch.fwd(q, k, v, scale, causal, softcap=softcap)
        return self._sdpa.fwd(q, k, v, scale, causal)

    def bwd(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
            scale: float, causal: Mask, *, softcap: float = 0.0
            ) -> tuple[Tensor, Tensor, Tensor]:
        if softcap:
            return self._torch.bwd(dout, q, k, v, out, lse, scale, causal, softcap=softcap)
        return self._sdpa.bwd(dout, q, k, v, out, lse, scale, causal)

    def decode(self, q: Tensor, k: Tensor, v: Tensor, runs: Sequence[tuple[int, int]],
               scale: float, *, head_runs: Sequence[Sequence[tuple[int, int]]] | None = None,
               logits: list[Tensor] | None = None, softcap: float = 0.0) -> Partial:
        """q [Hq, D] against pools k, v [Hkv, slots, D] (see `Backend.decode`); `head_runs`,
        `logits` and `softcap` as `partial.attend` takes them."""
        ext = self.kernel()
        if (ext is None or k.dtype not in DTYPES or v.dtype != k.dtype or q.device.type != "cpu"
                or not (k.is_contiguous() and v.is_contiguous())
                or not bool(torch.isfinite(q).all())):  # NaN rows: the torch path's rule
            return attend(q, k, v, scale, runs=runs, head_runs=head_runs, logits=logits,
                          softcap=softcap)
        hkv, n = k.shape[0], k.shape[1]
        per_head = head_runs if head_runs is not None else [runs] * hkv
        counts = [len(r) for r in per_head]
        bounds = torch.tensor([[h * n + lo, h * n + hi] for h, r in enumerate(per_head)
                               for lo, hi in r], dtype=torch.long).reshape(-1, 2)
        offsets = torch.tensor([0] + counts, dtype=torch.long).cumsum(0)
        return self.rows(ext, q, k, v, bounds, offsets, scale, logits, softcap)

    @staticmethod
    def rows(ext: Any, q: Tensor, k: Tensor, v: Tensor, bounds: Tensor, offsets: Tensor,
             scale: float, logits: list[Tensor] | None = None, softcap: float = 0.0
             ) -> Partial:
        """The kernel over pools read as [R, D] rows: KV head h reads the row runs
        bounds[offsets[h]:offsets[h + 1]] (absolute rows: any pool layout, e.g. a host
        tier's [S, Hkv, P, D] segment)."""
        hkv = offsets.numel() - 1
        qs = (q.float() * scale).contiguous()
        res = ext.decode(qs, k, v, bounds, offsets, float(softcap), logits is not None, TILE, 3)
        if logits is not None:
            seen = res[3].tolist()
            logits.extend(res[2][h, :, :seen[h]] for h in range(hkv))
        return Partial(res[0], res[1])
