"""The compiled CPU decode kernel (`kernels/cpu/decode.cpp`), built on first use.

Built with `torch.utils.cpp_extension.load` (g++ or clang, ninja) into a folder under the
cache directory ($RINGMEM_CACHE, default ~/.cache/ringmem) named by a hash of the source,
the torch version and the compiler flags, so a rebuild happens only when one changes; the
build takes about a minute once. No `-march` flag: every instruction-set path is compiled
with its own target attribute and chosen at run time from the CPU's features (`isa()`).
Where it cannot be built (no compiler, no ninja, a build error), `load` returns None and
logs one line saying why; callers then take the torch path.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).resolve().parent / "cpu" / "decode.cpp"
FLAGS = ("-O3", "-std=c++17", "-fopenmp")


def build_dir() -> Path:
    from ..demo.models import cache_dir
    files = sorted(SOURCE.parent.glob("*.[ch]*"))  # decode.cpp and its headers
    key = hashlib.sha256(b"".join(f.read_bytes() for f in files) + torch.__version__.encode()
                         + " ".join(FLAGS).encode()).hexdigest()[:16]
    return cache_dir() / "ext" / f"cpu_decode-{key}"


def load(verbose: bool = False) -> Any | None:
    """The built extension module (functions `decode`, `isa`), or None (logged)."""
    try:
        from torch.utils import cpp_extension
        where = build_dir()
        where.mkdir(parents=True, exist_ok=True)
        return cpp_extension.load(name="ringmem_cpu_decode", sources=[str(SOURCE)],
                                  build_directory=str(where), extra_cflags=list(FLAGS),
                                  extra_ldflags=["-fopenmp"], verbose=verbose)
    except Exception as exc:  # no compiler / ninja, or a failed build: the torch path
        lines = str(exc).strip().splitlines()
        why = next((x for x in lines if "error" in x.lower()), lines[-1] if lines else "")
        logging.getLogger("ringmem").warning(
            "ringmem: the compiled CPU decode kernel is unavailable (%s); decode uses the "
            "torch path", why.strip() or type(exc).__name__)
        return None
