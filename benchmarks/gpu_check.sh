#!/usr/bin/env bash
# The one prepared GPU check (under 8 minutes, unattended, from a bare GPU machine): benchmarks/gpu_check.py.
# mlflow and optuna are not installed there: carry their wheels in .whl (../shared/gpu/fetch-wheels.sh .whl),
# which this installs into /tmp/site. Without CUDA it runs a quick CPU smoke test of the same steps.
#   benchmarks/gpu_check.sh        JSON and logs: $OUT (or benchmarks/gpu_check_out)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! "$py" -c 'import mlflow, optuna' 2>/dev/null; then
  [ -d .whl ] || { echo "gpu_check: mlflow/optuna missing and no .whl to install from (../shared/gpu/fetch-wheels.sh .whl)" >&2; exit 2; }
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
# MLproject's commands say `python`; a machine with only python3 gets one for mlflow run's entry points.
if ! command -v python >/dev/null; then mkdir -p /tmp/pybin && ln -sf "$(command -v "$py")" /tmp/pybin/python && export PATH=/tmp/pybin:$PATH; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "$py" benchmarks/gpu_check.py "$@"
