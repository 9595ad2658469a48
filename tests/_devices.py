"""Device and dtype parameters of the Triton kernel tests.

`cpu` runs the kernels under the Triton interpreter (TRITON_INTERPRET=1, set by conftest
when CUDA is absent) in fp32/fp16 at small sizes: the interpreter computes bf16 wrongly.
`cuda` (marked `gpu`) runs the compiled kernels, adds bf16 and larger shapes.
"""
from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_CPU = pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")
_GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


def devices() -> list:
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
    """The half dtype a test of the fp16/bf16 kernels uses on this device."""
    return torch.bfloat16 if device == "cuda" else torch.float16
