"""The torchrun launcher runs end to end from a config; bad configs fail before any work."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ringmem.config import PrefillConfig, from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(ROOT / "launch" / "prefill.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_prefill_launcher_runs() -> None:
    res = _torchrun("--config", "configs/prefill_smoke.toml")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [l for l in res.stdout.splitlines() if l.startswith("[rank")]
    assert len(lines) == 2 and all("finite=True" in l for l in lines), res.stdout


def test_launcher_rejects_world_size_mismatch() -> None:
    res = _torchrun("--config", "configs/prefill_cpu.toml", "--seq-len", "64", nproc=1)
    assert res.returncode != 0
    assert "config asks for world_size=2, torchrun started 1" in res.stderr


def test_config_files_load() -> None:
    for path in sorted((ROOT / "configs").glob("prefill_*.toml")):
        assert isinstance(load_config(PrefillConfig, path), PrefillConfig)


@pytest.mark.parametrize("data,pattern", [
    ({"seq_len": 8, "colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ({"seq_len": "8"}, "key 'seq_len' must be <class 'int'>, got '8'"),
    ({"causal": 1}, "key 'causal' must be <class 'bool'>, got 1"),
    ({"heads": 6, "kv_heads": 4}, "heads=6 must be a multiple of kv_heads=4"),
    ({"layout": "ring"}, "layout must be one of"),
    ({"dtype": "int8"}, "dtype must be one of"),
])
def test_bad_config(data: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        from_dict(PrefillConfig, data, "test.toml")


def test_missing_config_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_config(PrefillConfig, tmp_path / "nope.toml")
