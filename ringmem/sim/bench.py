"""`ringmem bench`: the benchmarks and the simulator sweeps from one entry point.

    ringmem bench ring [args]        benchmarks/ring_cpu.py under torchrun (2 ranks)
    ringmem bench decode [args]      benchmarks/decode.py under torchrun (4 ranks)
    ringmem bench schedules [args]   benchmarks/schedules.py under torchrun (2 ranks)
    ringmem bench calibrate [--device cpu|cuda] [--out F] [--threads N]
    ringmem bench calibrate --host [--repeats N] [--out F]
                                     the host's per-call / per-step / message costs (gloo)
    ringmem bench validate [args]    benchmarks/sim_validation.py (published + CPU checks)
    ringmem bench sim [--profile P] [--quick] [--max-gpus N] [--out-dir D]
                                     simulator sweeps: efficiency vs GPUs and vs sequence
                                     length, schedule-choice maps, decode latency; PNG plots

`--nproc N` before the benchmark's own arguments changes the number of ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .paths import benchmarks_dir, progress

SCRIPTS = {"ring": ("ring_cpu.py", 2), "decode": ("decode.py", 4),
           "schedules": ("schedules.py", 2)}
JOBS = (*SCRIPTS, "calibrate", "validate", "sim")


def script_command(job: str, rest: list[str]) -> list[str]:
    """The command line that runs benchmark `job` with `rest` (torchrun for the ring ones)."""
    if job not in JOBS:
        raise ValueError(f"bench job must be one of {JOBS}, got {job!r}")
    d = benchmarks_dir()
    if job == "validate":
        return [sys.executable, str(d / "sim_validation.py"), *rest]
    name, nproc = SCRIPTS[job]
    if rest[:1] == ["--nproc"] and len(rest) > 1:
        if not rest[1].isdigit() or int(rest[1]) < 1:
            raise ValueError(f"--nproc must be an int >= 1, got {rest[1]!r}")
        nproc, rest = int(rest[1]), rest[2:]
    return [sys.executable, "-m", "ringmem.torchrun", "--standalone",
            f"--nproc-per-node={nproc}", str(d / name), *rest]


def write_profile(device: str, out: Path, threads: int | None = 1) -> Path:
    """Calibrate on `device` and write the profile JSON to `out`."""
    from .calibrate import calibrate
    prof = calibrate(device, threads=threads,
                     progress=lambda xs: progress(xs, f"calibrate {device}"))
    _write(out, {"profile": prof.to_json()})
    print(f"calibrate: {prof.name}: fwd {prof.fwd_flops / 1e9:.1f} GFLOP/s, bwd "
          f"{prof.bwd_flops / 1e9:.1f} GFLOP/s, causal x{prof.causal_efficiency:.2f}, "
          f"launch {prof.launch_s * 1e6:.0f} us, merge {prof.mem_bw / 1e9:.1f} GB/s -> {out}")
    return out


def write_host(out: Path, repeats: int) -> int:
    """Measure the host's costs on gloo ranks (`host.measure_host`) and write them."""
    from .host import measure_host
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    res = measure_host(repeats=repeats)
    if not res["step_s"] > 0:
        raise ValueError(f"the measured ring step came out {res['step_s'] * 1e3:.3f} ms: "
                         f"the noise exceeds it; rerun with more --repeats on a quiet "
                         f"machine")
    _write(out, res)
    ws = res["worlds"]
    print(f"calibrate --host: {res['call_s'] * 1e3:.2f} ms a call + agreement "
          f"{', '.join(f'{a * 1e3:.2f}' for a in res['agree_s'])} ms at worlds 2.., "
          f"{res['step_s'] * 1e3:.2f} ms a ring step, {res['latency_s'] * 1e3:.2f} ms a "
          f"message; loop measured / predicted: "
          + ", ".join(f"w{w} {m['run'] * 1e3:.2f}/{m['predicted_run'] * 1e3:.2f} ms"
                      for w, m in ws.items()) + f" -> {out}")
    return 0


def _write(out: Path, body: dict) -> None:
    """`body` as JSON at `out`, after a "meta" entry: date, machine, versions, load."""
    import platform
    from datetime import datetime, timezone

    import torch
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "load_average": _load()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, **body}, indent=1))


def _load() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:
        return []


def main(argv: list[str]) -> int:
    """`ringmem bench ...` (argv after "bench"). Returns the exit status."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    job, rest = argv[0], argv[1:]
    try:
        if job == "calibrate":
            p = argparse.ArgumentParser(prog="ringmem bench calibrate")
            p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
            p.add_argument("--threads", type=int, default=1)
            p.add_argument("--out", default=None)
            p.add_argument("--host", action="store_true",
                           help="the host's per-call, per-step and message costs on gloo "
                                "ranks instead (ringmem/sim/host.py)")
            p.add_argument("--repeats", type=int, default=200)
            a = p.parse_args(rest)
            if a.host:
                return write_host(Path(a.out) if a.out else benchmarks_dir() / "results"
                                  / "host_costs_cpu.json", a.repeats)
            out = Path(a.out) if a.out else (benchmarks_dir() / "results"
                                             / f"sim_profile_{a.device}.json")
            write_profile(a.device, out, a.threads)
            return 0
        if job == "sim":
            from .sweeps import run_sweeps
            return run_sweeps(rest)
        cmd = script_command(job, rest)
    except ValueError as e:
        print(f"ringmem bench: error: {e}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(benchmarks_dir()),
                                                      env.get("PYTHONPATH", "")]))
    return subprocess.call(cmd, env=env)
