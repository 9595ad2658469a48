"""Device parametrisation: every test that takes `device` runs on the CPU always and on
CUDA when the machine has it (marked `gpu`, skipped otherwise), so a GPU host exercises the
same tests on compiled Triton, SDPA's CUDA kernels and the CUDA copies."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[
               pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")])]


def half(device: str) -> torch.dtype:
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
