"""A worker that raised ringmem's CommError exits at once, whatever process group init the
script used: its teardown must not wait on the frozen peer (a plain
`dist.init_process_group` leaves gloo's 30-minute timeout on the posted transfer)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 3.0  # RINGMEM_TIMEOUT of the raising rank
FREEZE = 90  # seconds the other rank sleeps: without the fix, rank 0 waits for it

SCRIPT = f"""
import sys, time, torch, torch.distributed as dist
import ringmem
dist.init_process_group("gloo")  # plain torch init: gloo's own timeout is 30 minutes
q = ringmem.shard(torch.randn(1, 64, 2, 16), layout="zigzag")
if dist.get_rank() == 1:
    time.sleep({FREEZE})  # frozen peer
    sys.exit(0)
open(sys.argv[1], "w").write(repr(time.time()))  # rank 0 starts waiting now
ringmem.ring_attention(q, q, q, causal=True, layout="zigzag")
"""


def test_comm_error_exits_under_plain_init(tmp_path: Path) -> None:
    script, stamp = tmp_path / "frozen_peer.py", tmp_path / "start"
    script.write_text(SCRIPT)
    env = {**os.environ, "RINGMEM_TIMEOUT": str(TIMEOUT), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node=2", str(script), str(stamp)]
    # torchrun returns once a worker fails (it then stops the sleeping one)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=FREEZE + 60, env=env)
    done = time.time()
    assert res.returncode != 0, res.stderr[-2000:]
    assert "CommTimeoutError" in res.stderr, res.stderr[-2000:]
    waited = done - float(stamp.read_text())
    assert waited < TIMEOUT + 10, f"the raising rank took {waited:.1f} s to exit"
