"""Fault injection: a killed, frozen or wrongly-calling rank makes every other rank raise a
clear error within the timeout, under `spawn` and under torchrun, and no process remains.

Each test prints its measured exit times (shown with `pytest -rP`).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ringmem
from ringmem.cli import descendants
from ringmem.comm import RingComm
from ringmem.testing import SpawnError, spawn
from ringmem.timeouts import _LOST, resolve

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
T = 5.0  # the process-group / wait timeout of these runs
SLACK = 10.0  # scheduling on a loaded 2-core machine


def _qkv() -> list[torch.Tensor]:
    return [torch.randn(1, 16, 2, 8) for _ in range(3)]


def _mark(out_dir: str) -> None:
    with open(os.path.join(out_dir, "fault"), "w") as f:
        f.write(repr(time.time()))


def _fault_at(out_dir: str) -> float:
    return float(Path(out_dir, "fault").read_text())


def _gone(pids: list[int]) -> bool:
    """No such process, or only a reaped-at-exit zombie's absence: nothing left running."""
    return not [p for p in pids if os.path.exists(f"/proc/{p}")]


def _run_faulty(fn, *args) -> list:
    with pytest.raises(SpawnError) as info:
        spawn(fn, 2, *args, timeout=120, pg_timeout=T, grace=1.0)
    results = info.value.results
    assert _gone([r.pid for r in results]) and not multiprocessing.active_children(), results
    return results


def _peer_fails(rank: int, world: int, kind: str, out_dir: str) -> None:
    q, k, v = _qkv()
    ringmem.ring_attention(q, k, v)  # a healthy call first: the group works
    if rank == 1:
        def fault(self, *args, **kw) -> None:  # in the ring, before sending its block
            _mark(out_dir)
            if kind == "killed":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGSTOP)  # frozen: alive, never answers
        RingComm.move = fault
    ringmem.ring_attention(q, k, v, schedule="kv")  # the schedule that moves


@pytest.mark.parametrize("kind", ["killed", "frozen"])
def test_peer_killed_or_frozen_mid_ring(kind: str, tmp_path) -> None:
    r0, r1 = _run_faulty(_peer_fails, kind, str(tmp_path))
    took = r0.ended - _fault_at(str(tmp_path))
    print(f"[faults] spawn, rank 1 {kind} mid-ring: rank 0 raised {r0.error_type} "
          f"{took:.2f} s later: {r0.error}")
    assert r0.error_type == ("CommError" if kind == "killed" else "CommTimeoutError"), r0
    assert "ring_attention (fwd, step" in r0.error and "rank 1" in r0.error, r0.error
    if kind == "killed":
        assert "died or exited" in r0.error and took < T, (took, r0.error)
        assert r1.exitcode == 3 and r1.error is None, r1
    else:
        assert "gave up at the 5 s timeout" in r0.error and T * 0.8 < took < T + SLACK, took
        assert r1.killed, r1  # spawn ended the stopped rank


def _different_ops(rank: int, world: int, case: str) -> None:
    q, k, v = _qkv()
    if case == "barrier" and rank == 0:
        dist.barrier()
    elif case == "unshard" and rank == 1:
        ringmem.unshard(q)
    elif case == "subgroup":
        sub = dist.new_group([0, 1])  # both ranks create it; only rank 0 uses it
        ringmem.ring_attention(q, k, v, group=sub if rank == 0 else None)
    else:
        ringmem.ring_attention(q, k, v)


@pytest.mark.parametrize("case", ["unshard", "barrier", "subgroup"])
def test_ranks_in_different_operations(case: str) -> None:
    t0 = time.time()
    results = _run_faulty(_different_ops, case)
    took = [round(r.ended - t0, 1) for r in results]
    print(f"[faults] spawn, {case}: ranks raised after {took} s (incl. start-up): "
          + " | ".join(f"{r.error_type}: {r.error}" for r in results))
    assert all(r.error_type is not None for r in results), results  # every rank raised
    if case == "unshard":  # caught by the agreement step at once, with both names
        for r in results:
            assert r.error_type == "OperationMismatchError", r
            assert "rank 0: ring_attention, rank 1: unshard" in r.error, r.error
    else:
        # Both ranks wait out the same timeout; the first to give up closes its connections,
        # so the other may see them close just before its own timeout fires. Either way each
        # rank's message must be the right one for what it saw, and someone timed out first.
        timed = [_timed_out(r) for r in results]
        assert any(timed), results
        ours = results[1:] if case == "barrier" else results  # rank 0 sits in torch's barrier
        for r in ours:
            assert "ring_attention (cross-rank agreement)" in r.error, r.error
            assert case != "barrier" or "rank 0" in r.error, r.error
            if r.error_type == "CommTimeoutError":
                assert "gave up at the" in r.error and "timeout" in r.error, r.error
            else:
                assert r.error_type == "CommError" and "died or exited" in r.error, r
        if case == "barrier":
            r0 = results[0]
            assert timed[0] or any(s in r0.error.lower() for s in _LOST), r0
    assert max(r.ended for r in results) - min(r.ended for r in results) < T + SLACK


def _timed_out(r) -> bool:
    """The rank gave up on its own timeout (ringmem's error, or torch's for a barrier)."""
    return r.error_type == "CommTimeoutError" or "timed out" in (r.error or "").lower()


def _env() -> dict[str, str]:
    env = dict(os.environ, RINGMEM_TIMEOUT=str(T), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _tagged(tag: str) -> list[int]:
    """Live processes whose command line contains `tag` (a unique temp path)."""
    out = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and tag in Path(f"/proc/{p}/cmdline").read_text():
                out.append(int(p))
        except OSError:
            pass
    return out


@pytest.mark.parametrize("kind", ["killed", "frozen"])
def test_torchrun_peer_killed_or_frozen(kind: str, tmp_path) -> None:
    cmd = [sys.executable, "-m", "ringmem.torchrun", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "_fault_worker.py"), kind, str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(),
                         cwd=ROOT)
    took = time.time() - _fault_at(str(tmp_path))
    print(f"[faults] torchrun, rank 1 {kind}: torchrun exited {took:.2f} s later, rc "
          f"{res.returncode}; stderr: {res.stderr.strip()!r}")
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert not _tagged(str(tmp_path)), "a worker outlived torchrun"
    if kind == "killed":  # torchrun ends the survivor once it sees rank 1's exit
        assert "rank 1 (exit code 3)" in res.stderr and took < T + SLACK, res.stderr
    else:  # the survivor's own one-line error, within the timeout
        assert "fault_worker: ring_attention (fwd, step 0): rank 0 waited" in res.stderr, res.stderr
        assert "gave up at the 5 s timeout" in res.stderr and took < T + SLACK, took


def _ringmem(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ringmem.cli", *args], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


@pytest.mark.parametrize("args,message", [
    (["--seq-len", "63"], "prefill: layout 'zigzag' on 2 ranks splits the sequence into 4 "),
    (["--steps", "0"], "prefill: configs/prefill_smoke.toml: steps must be >= 1, got 0"),
    (["--colour", "red"], "prefill: unrecognized arguments: --colour red"),
    (["--timeout", "-1"], "timeout must be a positive number of seconds, got -1.0"),
])
def test_bad_config_is_one_line_before_torchrun(args: list[str], message: str) -> None:
    p = _ringmem("prefill", "--nproc", "2", "--config", "configs/prefill_smoke.toml", *args)
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0 and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err and not out, (out, err)


def test_sigterm_stops_torchrun_and_workers(tmp_path) -> None:
    # a long run (`--steps` big): stopped from outside once both workers are up
    p = _ringmem("prefill", "--nproc", "2", "--config", "configs/prefill_smoke.toml",
                 "--steps", "1000000")
    deadline, workers = time.monotonic() + 90, []
    while time.monotonic() < deadline and len(workers) < 2:
        time.sleep(0.5)
        workers = [w for w in descendants(p.pid)
                   if "ringmem.launch.prefill" in Path(f"/proc/{w}/cmdline").read_text()
                   and "torchrun" not in Path(f"/proc/{w}/cmdline").read_text()]
    tree = descendants(p.pid)
    assert len(workers) >= 2, "the workers did not start"
    time.sleep(2)  # let them enter the ring
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    took = time.monotonic() - t0
    print(f"[faults] SIGTERM to `ringmem prefill`: everything gone after {took:.2f} s")
    assert p.returncode == 128 + signal.SIGTERM, (p.returncode, err[-2000:])
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err[-2000:]
    assert _gone(tree) and took < 10, (tree, took)


def test_timeout_resolution(monkeypatch) -> None:
    monkeypatch.delenv("RINGMEM_TIMEOUT", raising=False)
    assert resolve() == 300.0 and resolve(None, default=7) == 7.0
    monkeypatch.setenv("RINGMEM_TIMEOUT", "12.5")
    assert resolve() == 12.5 and resolve(3) == 3.0  # the argument wins
    for bad in ("0", "-2", "inf", "soon"):
        monkeypatch.setenv("RINGMEM_TIMEOUT", bad)
        with pytest.raises(ValueError, match="RINGMEM_TIMEOUT must be a"):
            resolve()
