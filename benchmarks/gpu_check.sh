#!/usr/bin/env bash
# One prepared GPU check (under 5 minutes): epoch time vs the tutorial loop, fit with bf16 / torch.compile,
# evaluation images/s, the aggregate trials/min of 16 concurrent trials on one GPU vs one, and cohort
# throughput (K = 1, 4, 16, 64 fused trials vs as many separate fits, 12,000 images; fresh cohorts and
# refilled ones, whose members' orders differ). Needs torch
# and torchvision only (the tracking benchmark is skipped without mlflow). Without CUDA it runs a quick CPU fallback.
#   benchmarks/gpu_check.sh [more benchmarks/run.py flags]     JSON: $OUT/gpu_results.json or benchmarks/
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
out=${OUT:-benchmarks}/gpu_results.json
if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  "$py" -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
  args=(--device cuda --only epoch,options,eval,trials --repeats 2)
  cohort=(--device cuda --quick --only cohort --repeats 1)
else
  echo "no CUDA device: quick CPU fallback"
  args=(--device cpu --quick --only epoch,eval,trials)
  cohort=(--device cpu --quick --only cohort --repeats 1)
fi
timeout 170 "$py" benchmarks/run.py "${args[@]}" --out "$out" "$@" || echo "gpu_check: the first part stopped early (timeout or error)"
timeout 120 "$py" benchmarks/run.py "${cohort[@]}" --out "${out%.json}_cohort.json" "$@"
