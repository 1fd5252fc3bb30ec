"""mlflow run . -e main: prepare -> train -> evaluate as child runs of one run, reusing finished steps."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from cnnexp import tracking
from cnnexp.config import EvaluateConfig, MainConfig
from cnnexp.data import is_prepared, load_prepared
from pipelines import evaluate, prepare, train
from pipelines.common import make_parser, run_entry_point

REPO = Path(__file__).resolve().parents[1]


def code_version() -> str:
    """A hash of the code that computes results; unlike the git commit it also sees uncommitted edits."""
    digest = hashlib.sha256()
    for path in sorted([*REPO.glob("cnnexp/*.py"), *REPO.glob("pipelines/*.py")]):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def run_step(step: str, module, config, code: str, data_digest: str | None) -> tuple[str, bool]:
    """Runs a step as a child run, or finds its finished twin; returns (run id, reused).

    data_digest None means no earlier run can match (prepare, when there is no prepared data).
    """
    found = tracking.find_step_run(step, config, code, data_digest) if data_digest else None
    if found is not None:
        print(f"{step}: reusing finished run {found.info.run_id}")
        return found.info.run_id, True
    module.main(config)
    run_id = tracking.latest_child_run_id()
    tracking.mark_step(run_id, step, code)
    return run_id, False


def prepared_digest(config) -> str | None:
    """The digest of the data a prepare run would find, or None if it must (re)build it."""
    if not is_prepared(config.data_dir, config.dataset):
        return None
    return load_prepared(config.data_dir, config.dataset).digest


def main(config: MainConfig) -> dict[str, str]:
    config.validate()
    prepare_config, train_config = config.steps()
    code = code_version()
    with tracking.tracked_run(run_name="main"):
        tracking.log_config(config)
        # A prepare run counts only while the data it made is still there, unchanged.
        prepare_id, prepare_reused = run_step("prepare", prepare, prepare_config, code, prepared_digest(prepare_config))
        digest = tracking.run_tags(prepare_id)["data_digest"]
        train_id, train_reused = run_step("train", train, train_config, code, digest)
        evaluate_config = EvaluateConfig(model_uri=f"runs:/{train_id}/{tracking.MODEL_NAME}",
                                         data_dir=config.data_dir, dataset=config.dataset, device=config.device)
        evaluate_id, evaluate_reused = run_step("evaluate", evaluate, evaluate_config, code, digest)
        steps = {"prepare": prepare_id, "train": train_id, "evaluate": evaluate_id}
        reused = [name for name, flag in zip(steps, (prepare_reused, train_reused, evaluate_reused)) if flag]
        tracking.set_tags({**{f"{name}_run_id": run_id for name, run_id in steps.items()},
                           "reused_steps": ",".join(reused) or "none"})
    print("main: " + ", ".join(f"{name} {run_id}" + (" (reused)" if name in reused else "")
                               for name, run_id in steps.items()))
    return steps


def cli(argv: list[str] | None = None, prog: str = "main") -> int:
    return run_entry_point(make_parser(prog, __doc__, MainConfig), MainConfig, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
