"""The markdown (and JSON) report of benchmarks/sim_validation.py."""
from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from _common import git_commit, machine


def _header(lib: Any, profile_path: str) -> list[str]:
    m = machine()
    return [
        "# ringmem.sim validation: predicted vs published, and vs ringmem's CPU runs", "",
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {m['platform']}, CPU: {m['cpu']}, cpu_count: {m['cpu_count']}",
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"git commit {git_commit()}",
        "- device profiles: `ringmem/sim/published.json` (each number with its source); "
        f"CPU profile: `{Path(profile_path).name}` (`ringmem bench calibrate`)",
        "- target: every efficiency within 10 points, every ranking right; CPU within 10%", ""]


def _rfa(res: dict[str, Any], src: str) -> list[str]:
    out = ["## ring-flash-attn README table (8 GPUs, NVLink/NVSwitch)", "",
           f"Source: {src}", "",
           "Efficiency = distributed iter/s / (single-GPU flash_attn iter/s at 8192 tokens "
           "/ 8). Predicted with the ring-flash-attn loop's epilogue (`Impl.ring_flash_attn`, "
           "its merge ops counted from its source); the last column is ringmem's own loop "
           "on the same device (lighter fp32 merge).", "",
           "| GPU | phase | ring | published | predicted | error (points) | ringmem loop |",
           "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        out.append(f"| {r['gpu']} | {r['phase']} | {r['ring']} | {r['published']:.1%} | "
                   f"{r['predicted']:.1%} | {r['error_pts']:+.1f} | {r['ringmem_loop']:.1%} |")
    worst = max(abs(r["error_pts"]) for r in res["rows"])
    out += ["", f"Largest error {worst:.1f} points; rankings (basic < stripe < zigzag) right "
            f"in {res['rankings_right']}/{res['rankings']} rows.", ""]
    return out


def _yc(res: dict[str, Any], src: str) -> list[str]:
    out = ["## yunchang (USP) 8xA100 forward table", "", f"Source: {src}", "",
           "131072 tokens, batch 2, 8 heads, d=128, fp16, causal. `rel` = throughput / the "
           "Ulysses-8 row (an efficiency relative to pure Ulysses).", "",
           "| option | published iter/s | predicted iter/s | error | rel published | "
           "rel predicted | rel error (points) |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        out.append(f"| {r['option']} | {r['published']:.2f} | {r['predicted']:.2f} | "
                   f"{r['error_pct']:+.1f}% | {r['rel_pub']:.3f} | {r['rel_pred']:.3f} | "
                   f"{r['rel_error_pts']:+.1f} |")
    out += ["", f"Ranking of the six options right: {res['ranking_right']}.", ""]
    return out


def _tr(res: dict[str, Any], src: str) -> list[str]:
    out = ["## TokenRing, 4xA10 over PCIe", "", f"Source: {src}", "",
           "Published step times: TokenRing (`q`) ~3.5 ms (steps 0-1), ~4.6 ms (step 2); "
           "ring attention (`kv`) ~7.6 ms per step.", "",
           "| link | bandwidth GB/s | kv steps (ms) | q steps (ms) | kv total | q total |",
           "|---|---|---|---|---|---|"]
    for label, r in res.items():
        fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        out.append(f"| {label} | {r['bandwidth'] / 1e9:.1f} | {fmt(r['kv']['steps_ms'])} | "
                   f"{fmt(r['q']['steps_ms'])} | {r['kv']['total_ms']:.1f} | "
                   f"{r['q']['total_ms']:.1f} |")
    out.append("")
    return out


def _meta(res: dict[str, Any], src: str) -> list[str]:
    return ["## Meta context parallelism (Llama3 405B, 1M tokens, 128 H100)", "",
            f"Source: {src}", "",
            "| quantity | published | predicted |", "|---|---|---|",
            f"| attention layer efficiency (CP16 vs one node's single launch / 16) | - | "
            f"{res['attention_efficiency']:.1%} |",
            f"| prefill efficiency (linear layers perfectly parallel) | "
            f"{res['published_efficiency']:.0%} | {res['prefill_efficiency']:.1%} |",
            f"| 1M-token prefill (s) | {res['published_s']:.0f} | {res['prefill_s']:.0f} |",
            "", f"Linear layers: 2 x 405e9 FLOPs per token at an assumed "
            f"{res['gemm_flops'] / 1e12:.0f} TFLOP/s per GPU (not from a source; only the "
            "absolute time depends on it).", ""]


def _cpu(res: dict[str, Any]) -> list[str]:
    out = ["## CPU: ringmem's measured runs vs the simulator on a CPU calibration", "",
           f"Profile: {res['profile']}. Measured: `benchmarks/results/ring_cpu.json`, "
           "`schedules.json` (2 gloo ranks x 1 thread, fp32, zigzag, loopback link).", "",
           "| case | measured s | predicted s | error |", "|---|---|---|---|"]
    for r in res["rows"]:
        out.append(f"| {r['case']} | {r['measured']:.4f} | {r['predicted']:.4f} | "
                   f"{r['error_pct']:+.1f}% |")
    out += ["", f"Within 10%: {res['within_10pct']}/{len(res['rows'])}.", ""]
    return out


CASE_NAMES = {"ring_flash_attn": "ring-flash-attn", "yunchang": "yunchang",
              "meta_cp": "Meta CP"}


def _sensitivity(rows: list[dict[str, Any]]) -> list[str]:
    out = ["## Sensitivity of the GPU cases to each input", "",
           "Each input of `ringmem/sim/published.json` behind a GPU case, scaled alone by "
           "0.8, 0.9, 1.1 and 1.2 (integers rounded): the worst error of each case it feeds "
           "(ring-flash-attn: worst efficiency error; yunchang: worst error relative to "
           "Ulysses 8; Meta CP: prefill efficiency error; all in points). An input that moves "
           "nothing at +-20% is one the result does not rest on.", "",
           "| input | kind | as shipped | x0.8 | x0.9 | x1.1 | x1.2 |",
           "|---|---|---|---|---|---|---|"]

    def cell(d: dict[str, float]) -> str:
        return ", ".join(f"{CASE_NAMES[c]} {v:.1f}" for c, v in d.items())
    for r in rows:
        sc = r["scaled"]
        out.append(f"| `{r['input']}` | {r['kind']} | {cell(r['base'])} | "
                   + " | ".join(cell(sc[x]) for x in sorted(sc)) + " |")
    return out + [""]


def write_report(res: dict[str, Any], lib: Any, out: Path, profile_path: str,
                 notes: list[str] | None = None) -> None:
    pub = lib.published
    lines = _header(lib, profile_path)
    lines += _rfa(res["ring_flash_attn"], pub["ring_flash_attn"]["source"])
    lines += _yc(res["yunchang"], pub["yunchang"]["source"])
    lines += _tr(res["tokenring"], pub["tokenring"]["source"])
    lines += _meta(res["meta_cp"], pub["meta_cp"]["source"])
    lines += _cpu(res["cpu"])
    if "sensitivity" in res:
        lines += _sensitivity(res["sensitivity"])
    notes_file = out.with_name("sim_validation_notes.md")
    if notes_file.exists():  # the hand-written discussion: what matched, what not, why
        lines += [notes_file.read_text()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
