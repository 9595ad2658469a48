"""The kernels compiled offline for sm_90 (no GPU needed): fp32 dots stay IEEE fp32 (no
TF32 MMA in the PTX), and every tile of the sm_90 autotune sets at D = 128 compiles
without spills, within shared memory, with wgmma for bf16 (`benchmarks/compile_kernels.py
--check`), in the causal variant and in the band and band + softcap ones (*_band, *_cap:
their own sets, `configs.VARIANT_TILES`)."""
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
KERNELS = ("fwd", "dkdv", "dq", "fwd_band", "dkdv_band", "dq_band", "fwd_cap", "dkdv_cap",
           "dq_cap", "decode", "runs")


def test_sm90_fp32_dots_are_ieee_and_sets_fit(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--archs", "90", "--dims", "128",
                          "--dtypes", "fp32,bf16", "--kernels", ",".join(KERNELS),
                          "--check", "--json-only", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "kernels_sm90.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == set(KERNELS)
    for r in rows:
        assert not r.get("error"), r
        assert not r["tf32"], f"{r['kernel']} {r['dtype']} runs a dot in TF32"
        if r["dtype"] == "fp32":
            assert r["mma"] == "none (FMA)", r
        elif r["kernel"] not in ("decode", "runs"):  # D = 128: no wgmma-less substitute
            assert r["mma"] == "wgmma", r
