#!/usr/bin/env bash
# The prepared GPU benchmark: one run on a machine with one NVIDIA GPU, about 8 minutes in all.
#
#   bash benchmarks/gpu.sh                          # results in ./gpu-out
#   OUT=/an/empty/folder bash benchmarks/gpu.sh     # results there; extra arguments go to
#                                                   # bench_gpu.py (e.g. --budget 200)
#
# Needs this checkout with its venv built (python3 -m venv .venv && . .venv/bin/activate &&
# pip install -e '.[test,onnx]'), no network. Writes into "$OUT":
#
#   nvidia-smi.txt  the card, driver and CUDA version as nvidia-smi shows them before the run
#   gpu.json        every measurement (layout: benchmarks/bench_gpu.py's docstring): the card
#                   name, torch/CUDA/cuDNN versions and CPU count; teacher (10x, 224 px) and
#                   student (5x, 2.5x, 1.25x: 112, 56, 28 px) inference and training images/s in
#                   fp32, bf16 + channels_last, and that under torch.compile while time lasts;
#                   the training loader's samples/s at 1, 2, 4 ... workers and per worker (CPU
#                   core), and with batches prepared on the GPU, alone and feeding a teacher step
#                   and a distillation step; the GPU's mean utilisation (nvidia-smi every 0.2 s)
#                   and peak memory of each measurement
#   gpu.md          the same as a Markdown table of rows (for the README)
#   gpu.txt         everything printed: one progress line per measurement, then the table
#
# bench_gpu.py rewrites gpu.json after every measurement and starts none after its 380 s
# budget; stopped by the 450 s timeout below, it still prints (and writes) what finished.
set -euo pipefail
mkdir -p "${OUT:=gpu-out}"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" || true
else
    echo "no nvidia-smi on this machine: torch runs on the CPU" | tee "$OUT/nvidia-smi.txt"
fi
status=0
timeout -k 30 450 python -u benchmarks/bench_gpu.py --out "$OUT/gpu.json" "$@" 2>&1 \
    | tee "$OUT/gpu.txt" || status=$?
echo "bench_gpu.py exit status $status (124: stopped by the timeout); in $OUT:"
ls -l "$OUT"
exit "$status"
