"""The kernels compiled offline for sm_90 (no GPU needed): fp32 dots stay IEEE fp32 (no
TF32 MMA in the PTX), and every tile of the sm_90 autotune sets at D = 128 compiles
without spills, within shared memory, with wgmma for bf16 (`benchmarks/compile_kernels.py
--check`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

pytestmark = [pytest.mark.triton, pytest.mark.slow]
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_kernels.py"


def test_sm90_fp32_dots_are_ieee_and_sets_fit(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--archs", "90", "--dims", "128",
                          "--dtypes", "fp32,bf16", "--kernels", "fwd,dkdv,dq,decode,runs",
                          "--check", "--json-only", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "kernels_sm90.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"fwd", "dkdv", "dq", "decode", "runs"}
    for r in rows:
        assert not r.get("error"), r
        assert not r["tf32"], f"{r['kernel']} {r['dtype']} runs a dot in TF32"
        if r["dtype"] == "fp32":
            assert r["mma"] == "none (FMA)", r
        elif r["kernel"] in ("fwd", "dkdv", "dq"):
            assert r["mma"] == "wgmma", r
