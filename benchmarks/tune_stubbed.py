"""`cnnexp tune` with each trial's MLflow tracking stubbed out (run, epochs, end, model, and the study end's
look-up of each trial's model): beside the real command, the share of a study's wall that tracking takes
(benchmarks/gpu_check.py). The parent run, its summary and figures are kept.

    python benchmarks/tune_stubbed.py --n-trials 100 --epochs 5     # tune's own flags
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnnexp.tuning import report, trials  # noqa: E402
from pipelines.cli import main  # noqa: E402

trials.start_child_run = lambda *args, **kwargs: "stubbed"
trials.log_child_epoch = trials.end_child_run = trials.log_model_and_finish = lambda *args, **kwargs: None
report.model_id_of = lambda run_id: None  # the trials' runs do not exist

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
