"""Block-attention backends behind one protocol, chosen by name or by `"auto"`."""
from __future__ import annotations

import torch

from .base import Backend
from .cpu_backend import CpuBackend
from .flash_attn_backend import FlashAttnBackend
from .sdpa import SdpaBackend
from .torch_ref import TorchBackend
from .triton_backend import TritonBackend

_REGISTRY: dict[str, Backend] = {"sdpa": SdpaBackend(), "torch": TorchBackend(),
                                 "triton": TritonBackend(), "flash_attn": FlashAttnBackend(),
                                 "cpu": CpuBackend()}
# "auto" takes the first that supports the inputs: fused GPU kernels first; on CPU the
# fused op before the reference (the Triton interpreter is for tests, never chosen)
_AUTO_ORDER = {"cuda": ("flash_attn", "triton", "sdpa", "torch"), "cpu": ("sdpa", "torch")}
BACKENDS = ("auto",) + tuple(_REGISTRY)


def check_backend_name(name: object) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, *,
                bands: bool = False, softcap: bool = False) -> Backend:
    """The backend `name` (or the fastest available for `"auto"`), checked against the
    inputs and the features the call needs (band masks for windows, a logit softcap)."""
    check_backend_name(name)
    needs = {"bands": bands, "softcap": softcap}
    if name == "auto":
        for cand in _AUTO_ORDER.get(device.type, ("torch",)):
            if _REGISTRY[cand].unsupported(device, dtype, head_dim, **needs) is None:
                return _REGISTRY[cand]
        raise ValueError(f"no backend supports device={device}, dtype={dtype}, "
                         f"head_dim={head_dim}, {needs}")
    backend = _REGISTRY[name]
    why = backend.unsupported(device, dtype, head_dim, **needs)
    if why:
        raise ValueError(f"backend {name!r} cannot run these inputs: {why}")
    return backend


__all__ = ["Backend", "BACKENDS", "check_backend_name", "get_backend"]
