"""Helpers every benchmark report uses: what machine and which code produced the numbers."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Callable

import torch

from ringmem.sim.host import rank_times as timed  # noqa: F401 (the benchmarks' timer)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count()}


def git_commit() -> str:
    """Short commit of the checkout the benchmark runs from ("unknown" outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).resolve().parent
                              ).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def grad_leaves(ts: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in ts]


def fwd_bwd(attn: Callable[..., torch.Tensor], leaves: list[torch.Tensor],
            dout: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for t in leaves:
            t.grad = None  # fresh grads each repeat, not accumulated ones
        attn(*leaves).backward(dout)
    return run
