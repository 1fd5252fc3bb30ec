"""Can MLflow's import hide behind training? Why `train` and `tune` import MLflow before their first step.

MLflow and its sqlite store take about 1.7 s to import on this CPU: the largest share of a short command's fixed
cost after torch (docs/performance.md, "Start-up"). Imported on a thread while training runs, it would leave the
critical path, if the two can share the machine. This measures, in fresh processes, side by side:

- `steps alone`, then `import alone`: batch-100 training steps of fit's fused step, and the import, one after
  the other (what the commands do today);
- `thread`: the import on a thread while the main thread steps (Python's default 5 ms switch interval);
- `thread, 0.2 ms switch`: the same with the interpreter switching threads every 0.2 ms, so that a step waits
  less for the GIL that the import holds;
- `process`: the import in a second process while this one steps (what a tracking process of its own would do).

    python benchmarks/overlap.py [--steps 300] [--repeats 3]

Each row's `wall` is from the start of both to the end of both; `saved` is what it gains on the serial sum.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT = "import mlflow, mlflow.store.tracking.sqlalchemy_store"

CHILD = """
import subprocess, sys, threading, time
import torch
import torch.nn.functional as F
from cnnexp.fused import flatten, fused_forward, row_views
from cnnexp.model import Network

mode, n = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
params = [v.detach().requires_grad_() for v in row_views(flatten(list(Network().parameters())).unsqueeze(0))]
x, y = torch.rand(100, 1, 28, 28), torch.randint(0, 10, (100,))


def steps():
    started = time.perf_counter()
    for _ in range(n):
        loss = F.cross_entropy(fused_forward(params, x).flatten(0, 1), y)
        torch.autograd.grad(loss, params)
    return time.perf_counter() - started


def do_import():
    started = time.perf_counter()
    exec(IMPORT)
    return time.perf_counter() - started


for _ in range(3):  # one-time kernel set-up out of the way
    loss = F.cross_entropy(fused_forward(params, x).flatten(0, 1), y)
    torch.autograd.grad(loss, params)
started = time.perf_counter()
if mode == "serial":
    step_s = steps()
    import_s = do_import()
elif mode == "process":
    child = subprocess.Popen([sys.executable, "-c", "import time; started = time.perf_counter(); " + IMPORT
                              + "; print(time.perf_counter() - started)"], stdout=subprocess.PIPE, text=True)
    step_s = steps()
    import_s = float(child.communicate()[0])  # the child's own, after its interpreter started
else:
    if mode == "fast":
        sys.setswitchinterval(0.0002)
    result = {}
    thread = threading.Thread(target=lambda: result.update(import_s=do_import()))
    thread.start()
    step_s = steps()
    thread.join()
    import_s = result["import_s"]
print(step_s, import_s, time.perf_counter() - started)
"""

MODES = {"serial": "steps alone, then import alone", "thread": "thread", "fast": "thread, 0.2 ms switch",
         "process": "process"}


def measure(mode: str, steps: int) -> tuple[float, float, float]:
    code = f"IMPORT = {IMPORT!r}\n" + CHILD
    done = subprocess.run([sys.executable, "-c", code, mode, str(steps)], capture_output=True, text=True, cwd=ROOT,
                          check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    step_s, import_s, wall_s = map(float, done.stdout.split())
    return step_s, import_s, wall_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {mode: [measure(mode, args.steps) for _ in range(args.repeats)] for mode in MODES}
    serial = statistics.median(wall for *_, wall in rows["serial"])
    print(f"{args.steps} steps at batch 100 and `{IMPORT}`; medians of {args.repeats}")
    print(f"{'mode':32} {'steps s':>8} {'import s':>9} {'wall s':>7} {'saved':>7}")
    for mode, label in MODES.items():
        step_s, import_s, wall_s = (statistics.median(column) for column in zip(*rows[mode]))
        print(f"{label:32} {step_s:8.2f} {import_s:9.2f} {wall_s:7.2f} {serial - wall_s:+7.2f}")


if __name__ == "__main__":
    main()
