"""The markdown report of `ringmem bench sim`."""
from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def _commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent
                              ).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write(res: dict[str, Any], out: Path, plots: list[Path]) -> None:
    c = res["config"]
    lines = [
        "# ringmem.sim sweeps", "",
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()} (the simulation runs anywhere; it predicts GPUs)",
        f"- python {platform.python_version()}, git commit {_commit()}",
        f"- profile: {res['profile']} (`ringmem/sim/published.json`); links: 8 GPUs per "
        "node on NVSwitch (h800-nvswitch), InfiniBand NDR between nodes (ib-ndr)",
        f"- attention: {c['hq']} q / {c['hkv']} kv heads, d={c['d']}, {c['dtype']}, causal, "
        f"batch 1, zigzag; quick={c['quick']}; {res['seconds']:.0f} s", "",
        "Efficiency = the attention's FLOPs at the profile's unmasked attention rate, "
        "shared by the GPUs, / simulated time (the fraction of the kernel's peak reached).",
        ""]
    if "rates" in res:
        rt = res["rates"]
        lines += [
            f"What it rests on: one device runs unmasked blocks at "
            f"{rt['unmasked_tflops']:.0f} TFLOP/s (forward) and blocks the causal mask cuts "
            f"through at {rt['causal_efficiency']:.0%} of that "
            f"({rt['unmasked_tflops'] * rt['causal_efficiency']:.0f} TFLOP/s); both from the "
            "profile's sources (`published.json`). One GPU runs the whole layer as one causal "
            "launch, so it reaches at most that fraction; a ring splits the work into "
            "diagonal blocks (causal, the slower rate) and off-diagonal ones (unmasked, the "
            "full rate), so 2 or more GPUs can reach a higher fraction of the peak than one "
            "GPU. That is the model, not a bug; it is only as right as the causal-block "
            "efficiency, which the validation's sensitivity table shows the results rest on.",
            ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    lines += ["## Efficiency vs GPUs", "", "| GPUs | option | time ms | efficiency |",
              "|---|---|---|---|"]
    lines += [f"| {r['gpus']} | {r['option']} | {1e3 * r['time_s']:.2f} | "
              f"{r['efficiency']:.1%} |" for r in res["gpus"]]
    lines += ["", "## Efficiency vs sequence length (8 GPUs)", "",
              "| tokens | option | time ms | efficiency |", "|---|---|---|---|"]
    lines += [f"| {r['seq']} | {r['option']} | {1e3 * r['time_s']:.3f} | "
              f"{r['efficiency']:.1%} |" for r in res["seq"]]
    lines += ["", "## Fastest option (8 GPUs)", "", "| link | K/V heads | context | best | "
              "time ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['link']} | {r['kv_heads']} | {r['context']} | {r['best']} | "
              f"{1e3 * r['time_s']:.3f} |" for r in res["maps"]]
    lines += ["", "## Decode latency (one token, one layer)", "", "| context | GPUs | "
              "latency ms |", "|---|---|---|"]
    lines += [f"| {r['context']} | {r['gpus']} | {1e3 * r['latency_s']:.3f} |"
              for r in res["decode"]]
    out.write_text("\n".join(lines) + "\n")
