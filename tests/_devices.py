"""Device parametrisation: tests that take `device` run on the CPU always and on CUDA when
the machine has it (marked `gpu`, skipped otherwise), so a GPU host exercises the same tests
on compiled Triton, SDPA's CUDA kernels and the CUDA copies.

Triton kernel tests use `devices()` / `device_dtypes()`: their `cpu` runs the kernels under
the Triton interpreter (TRITON_INTERPRET=1, set by conftest when CUDA is absent) in
fp32/fp16 at small sizes (the interpreter computes bf16 wrongly); `cuda` runs the compiled
kernels, adds bf16 and larger shapes.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_CPU = pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")
_GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=_GPU)]
"""Every device, for tests that need no Triton interpreter on the CPU."""


def devices() -> list:
    """Devices of the Triton kernel tests (the CPU only under the interpreter)."""
    return [pytest.param("cpu", marks=_CPU), pytest.param("cuda", marks=_GPU)]


def dtypes_for(device: str) -> tuple[torch.dtype, ...]:
    if device == "cuda":
        return torch.float32, torch.float16, torch.bfloat16
    return torch.float32, torch.float16


def device_dtypes() -> list:
    """(device, dtype) params: fp32/fp16 everywhere, bf16 on CUDA only."""
    out = []
    for dev in ("cpu", "cuda"):
        marks = _CPU if dev == "cpu" else _GPU
        out += [pytest.param(dev, dt, marks=marks, id=f"{dev}-{DTYPE_IDS[dt]}")
                for dt in dtypes_for(dev)]
    return out


def half_dtype(device: str) -> torch.dtype:
    """The 16-bit dtype to test: bf16 on CUDA; fp16 on the CPU (the Triton interpreter
    computes bf16 wrongly)."""
    return torch.bfloat16 if device == "cuda" else torch.float16


@contextlib.contextmanager
def no_host_sync(device: str) -> Iterator[None]:
    """On CUDA, any operation that synchronises the host with the GPU raises inside this
    block (torch's sync debug mode); on the CPU it does nothing."""
    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
