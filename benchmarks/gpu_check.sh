#!/usr/bin/env bash
# One GPU check, <= 8 minutes on one H100/H200 including Triton JIT (each step has a time
# cap; the caps add up to 480 s): the gpu tests, an NCCL world-size-1 smoke run of the
# ring (send-to-self + the return group) and of
# `ringmem prefill`, the kernel benchmark (D=64/128, GQA), decode at 128K-1M tokens, a
# graphed decode captured in a CUDA graph and replayed against eager decode, a
# CUDA calibration of the simulator's kernel model (`ringmem bench calibrate`), and
# the int32-overflow shapes last. Everything goes under one results folder.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]     (default: $OUT, else benchmarks/results/gpu_check)
#
# Runs under the GPU image's python3 as it is (Python 3.12, torch 2.11, Triton 3.6, no
# registry): the project is installed with --no-deps --no-build-isolation, never the pinned
# CPU torch; a missing package is reported and its step skipped. Without a GPU it says so
# and exits 0 (a dry run).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RES=${1:-${OUT:-benchmarks/results/gpu_check}}
PY=${PYTHON:-python3}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: needs a CUDA GPU and none is visible here: nothing run (dry run, exit 0)"
  exit 0
fi
mkdir -p "$RES"
SUMMARY="$RES/summary.md"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  $PY - <<'PY'
import importlib.util, platform, torch
p = torch.cuda.get_device_properties(0)
print(f"- device: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
      f"{p.multi_processor_count} SMs")
print(f"- python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}")
for name in ("triton", "transformers", "flash_attn", "pytest", "hypothesis"):
    spec = importlib.util.find_spec(name)
    if spec is None:
        print(f"- {name}: MISSING (its steps are skipped)")
    else:
        mod = __import__(name)
        print(f"- {name} {getattr(mod, '__version__', '?')}")
PY
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
} > "$SUMMARY"
cat "$SUMMARY"

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $RES/NAME.log, add a summary row
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS status
  echo "== $name (limit ${limit}s)"
  timeout --signal=KILL "$limit" "$@" > "$RES/$name.log" 2>&1
  case $? in
    0) status=ok ;;
    137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (see $name.log)" ;;
  esac
  tail -n 5 "$RES/$name.log"
  echo "| $name | $status | $((SECONDS - t0)) |" >> "$SUMMARY"
}
have() { $PY -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)"; }
skip() { echo "| $1 | skipped: $2 |  |" >> "$SUMMARY"; echo "== $1: skipped ($2)"; }

step install 30 $PY -m pip install --no-deps --no-build-isolation --no-index -q -e .
if have pytest; then
  step gpu_tests 120 $PY -m pytest -q -m gpu -p no:cacheprovider --maxfail=20 tests
else
  skip gpu_tests "pytest missing"
fi
step nccl_ring 40 $PY -m torch.distributed.run --standalone --nproc-per-node 1 \
  benchmarks/gpu/nccl_smoke.py
step prefill 40 $PY -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m ringmem.launch.prefill --config configs/prefill_smoke.toml --backend auto
if have triton; then
  step kernels 95 $PY benchmarks/kernel_speed.py --dims 64,128 --seqlens 4096,16384 \
    --contexts 131072,1048576 --repeats 5 --out "$RES/kernels.md"
else
  skip kernels "triton missing"
fi
step decode 60 $PY -m torch.distributed.run --standalone --nproc-per-node 1 \
  benchmarks/decode.py --contexts 131072,524288,1048576 --steps 5 \
  --prefill-tokens 8192 --prefill-chunks 2048,8192 --out "$RES/decode.md"
# GraphedDecode captured and replayed (one rank), every step checked against eager decode
step graphed_decode 35 $PY benchmarks/graphed_decode.py --context 65536 --layers 4 \
  --steps 20 --out "$RES/graphed_decode.md"
# block times over a grid of shapes -> the simulator's profile (ringmem/sim/calibrate.py)
step sim_calibrate 25 $PY -m ringmem.cli bench calibrate --device cuda \
  --out "$RES/sim_profile_cuda.json"
if have triton; then
  step int64_shapes 35 $PY benchmarks/gpu/int64_shapes.py
else
  skip int64_shapes "triton missing"
fi
echo
cat "$SUMMARY"
grep -q "FAILED\|TIMEOUT" "$SUMMARY" && exit 1
exit 0
