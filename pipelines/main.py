"""mlflow run . -e main: prepare -> train -> evaluate as child runs of one run, reusing finished steps."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from cnnexp.config import EvaluateConfig, MainConfig
from cnnexp.data import is_prepared, load_prepared, naming_held
from cnnexp.tracking import tags
from cnnexp.tracking.log import log_config
from cnnexp.tracking.models import MODEL_NAME
from cnnexp.tracking.queries import find_step_run, mark_step
from cnnexp.tracking.runs import set_tags, tracked_run
from pipelines import cli as commands
from pipelines import evaluate, prepare, train

REPO = Path(__file__).resolve().parents[1]
CODE = ("cnnexp/**/*.py", "pipelines/**/*.py")  # the code that computes results, subpackages included


def code_version() -> str:
    """A hash of the code that computes results; unlike the git commit it also sees uncommitted edits."""
    repo, digest = REPO, hashlib.sha256()
    for path in sorted(path for pattern in CODE for path in repo.glob(pattern)):
        digest.update(path.relative_to(repo).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def run_step(step: str, module, config, code: str, data_digest: str | None, **inputs) -> tuple[str, object | None]:
    """Runs a step as a child run (its main given `inputs` too), or finds its finished twin; returns
    (run id, what the step made), the latter None for a reused run.

    data_digest None means no earlier run can match (prepare, when there is no prepared data).
    """
    found = find_step_run(step, config, code, data_digest) if data_digest else None
    if found is not None:
        print(f"{step}: reusing finished run {found.info.run_id}")
        return found.info.run_id, None
    made = module.main(config, **inputs)
    mark_step(made.run_id, step, code)
    return made.run_id, made.result


def prepared_digest(config) -> str | None:
    """The digest of the data a prepare run would find, or None if it must (re)build it."""
    if not is_prepared(config.data_dir, config.dataset):
        return None
    return load_prepared(config.data_dir, config.dataset).digest


def main(config: MainConfig) -> dict[str, str]:
    config.validate()
    prepare_config, train_config = config.steps()
    code = code_version()
    with tracked_run(run_name="main"):
        log_config(config)
        # A prepare run counts only while the data it made is still there, unchanged.
        prepare_id, prepared = run_step("prepare", prepare, prepare_config, code, prepared_digest(prepare_config))
        data = prepared or load_prepared(config.data_dir, config.dataset)  # once, for every step
        train_config = naming_held(train_config, data)  # as train logs it, so a finished twin is found
        train_id, history = run_step("train", train, train_config, code, data.digest, data=data)
        evaluate_config = EvaluateConfig(model_uri=f"runs:/{train_id}/{MODEL_NAME}",
                                         data_dir=config.data_dir, dataset=config.dataset, device=config.device)
        evaluate_id, metrics = run_step("evaluate", evaluate, evaluate_config, code, data.digest, data=data)
        steps = {"prepare": prepare_id, "train": train_id, "evaluate": evaluate_id}
        reused = [name for name, made in zip(steps, (prepared, history, metrics)) if made is None]
        set_tags({**{f"{name}_run_id": run_id for name, run_id in steps.items()},
                  tags.REUSED_STEPS: ",".join(reused) or "none"})
    print("main: " + ", ".join(f"{name} {run_id}" + (" (reused)" if name in reused else "")
                               for name, run_id in steps.items()))
    return steps


def cli(argv: list[str] | None = None, prog: str = "main") -> int:
    return commands.run("main", argv, prog)


if __name__ == "__main__":
    sys.exit(cli())
