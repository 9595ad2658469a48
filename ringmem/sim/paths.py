"""Small helpers of the bench command and the sweeps: where the benchmark scripts are, and
a progress bar when tqdm is installed."""
from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path


def benchmarks_dir() -> Path:
    """The repository's benchmarks/ folder (ringmem runs from a checkout or an editable
    install; the scripts are not part of the wheel)."""
    d = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (d / "ring_cpu.py").exists():
        raise ValueError(f"benchmarks/ not found next to the package (looked in {d}); run "
                         f"from a checkout of ringmem")
    return d


def progress(items: Iterable, desc: str = "") -> Iterable:
    """tqdm's bar when it is installed (the dev/bench extras), else the items as they are."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(list(items), desc=desc, file=sys.stderr)
