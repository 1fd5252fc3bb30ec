#!/usr/bin/env bash
# One prepared GPU check (under 5 minutes): epoch time vs the tutorial loop, fit with bf16 / torch.compile,
# evaluation images/s and the aggregate trials/min of 16 concurrent trials on one GPU vs one. Needs torch
# and torchvision only (the tracking benchmark is skipped without mlflow). Without CUDA it runs a quick CPU fallback.
#   benchmarks/gpu_check.sh [more benchmarks/run.py flags]     JSON: $OUT/gpu_results.json or benchmarks/
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
out=${OUT:-benchmarks}/gpu_results.json
if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  "$py" -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
  args=(--device cuda --only epoch,options,eval,trials --repeats 3)
else
  echo "no CUDA device: quick CPU fallback"
  args=(--device cpu --quick --only epoch,eval,trials)
fi
timeout 290 "$py" benchmarks/run.py "${args[@]}" --out "$out" "$@"
