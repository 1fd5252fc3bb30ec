"""What a study amounts to: its summary, trials table and figures, written on its parent run; progress lines."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from cnnexp.config import TuneConfig
from cnnexp.tracking import tags
from cnnexp.tracking.log import log_config, log_csv, log_dict, log_figure, log_metrics, log_params
from cnnexp.tracking.models import model_id_of
from cnnexp.tracking.runs import set_tags, tracked_run
from cnnexp.tuning.counts import state_counts
from cnnexp.tuning.space import optuna_names, params_of
from cnnexp.tuning.study import study_settings
from cnnexp.verbosity import verbose

if TYPE_CHECKING:  # matplotlib loads on a thread while trials train (import_figures_in_background)
    from matplotlib.figure import Figure


def summary(study: optuna.Study) -> dict:
    counts = state_counts(study)  # a trial stopped and queued again is not failed (counts.py)
    result = {
        "trials_complete": counts["complete"], "trials_pruned": counts["pruned"], "trials_failed": counts["failed"],
        "trials_requeued": counts["requeued"], "trials_total": counts["total"],
    }
    if counts["complete"]:
        result.update(best_value=study.best_value, best_trial=study.best_trial.number, best_params=params_of(study.best_trial))
    return result


def summary_line(result: dict) -> str:
    requeued = f", {result['trials_requeued']} stopped and queued again" if result.get("trials_requeued") else ""
    return (f"{result['trials_complete']} complete, {result['trials_pruned']} pruned, {result['trials_failed']} failed"
            f"{requeued}; best val_accuracy {result.get('best_value', float('nan')):.4f}")


def progress_text(study: optuna.Study, trial: FrozenTrial) -> str:
    """One line per finished trial: its params, value, state and the study's best so far."""
    params = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params_of(trial).items())
    reported = trial.intermediate_values  # a pruned trial shows its last reported val accuracy
    value = trial.value if trial.value is not None else reported.get(max(reported, default=0))
    shown = "-" if value is None else f"{value:.4f}"
    try:
        best_trial = study.best_trial  # one read: other workers finish trials meanwhile
        best = f"{best_trial.value:.4f} (trial {best_trial.number})"
    except ValueError:  # no complete trial yet
        best = "-"
    state = trial.state.name + (f" at epoch {max(reported)}" if trial.state.name == "PRUNED" and reported else "")
    return f"trial {trial.number:>3}  {params}  val_acc {shown}  {state}  best {best}"


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """Optuna's trials_dataframe() plus each trial's batch size (Optuna's params hold its exponent), MLflow
    run id, and its cohort where an earlier version recorded one."""
    frame = study.trials_dataframe()
    trials = study.get_trials(deepcopy=False)  # the frame's rows, in order
    attrs = [trial.user_attrs for trial in trials]
    if "params_lr" in frame:  # beside lr, where a person reads the point
        frame.insert(frame.columns.get_loc("params_lr") + 1, "batch_size",
                     [params_of(trial).get("batch_size") for trial in trials])
    frame["mlflow_run_id"] = [a.get("mlflow_run_id") for a in attrs]
    if any("cohort" in a for a in attrs):
        frame["cohort"] = [a.get("cohort") for a in attrs]
    return frame


def import_figures_in_background() -> threading.Thread:
    """Imports what the study's figures need (Optuna's matplotlib plots: about a second) on a thread while
    trials train: torch's kernels run without the GIL, so the import comes off the study's end."""
    thread = threading.Thread(target=importlib.import_module, args=("optuna.visualization.matplotlib",),
                              name="figure-imports", daemon=True)
    thread.start()
    return thread


def import_figures_after_first_trial() -> Callable[[optuna.Study, FrozenTrial], None]:
    """A trial callback that starts import_figures_in_background once a trial has ended, for a study that
    trains in this process: started before, the import holds the GIL while the engine is set up and takes
    its first steps (0.6 s later to the first step, benchmarks/startup.py)."""
    started: list[threading.Thread] = []

    def on_trial_end(study: optuna.Study, trial: FrozenTrial) -> None:
        if not started:
            started.append(import_figures_in_background())

    return on_trial_end


def figures(study: optuna.Study) -> dict[str, Figure]:
    """Study figures by file name; a figure Optuna cannot draw yet (too few trials) is left out."""
    from optuna.visualization import matplotlib as vis  # seconds of import, paid only once a study ends

    searched = optuna_names(study)  # batch size as the study searched it: its exponent, or an old study's categorical
    makers = {
        "optimization_history.png": lambda: vis.plot_optimization_history(study),
        "contour_lr_batch_size.png": lambda: vis.plot_contour(study, params=searched),
        "slice.png": lambda: vis.plot_slice(study, params=searched),
        "intermediate_values.png": lambda: vis.plot_intermediate_values(study),
        "parallel_coordinate.png": lambda: vis.plot_parallel_coordinate(study, params=searched),
        # One bar per trial over wall time, coloured by state: how workers (and cohorts) spent the study.
        "timeline.png": lambda: vis.plot_timeline(study),
    }
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 2:
        # PED-ANOVA, not the default fANOVA: its random forest took 2 s (import and fit) of a 30 s study.
        # Asked only where it can be drawn: importing optuna.importance alone takes a second.
        makers["param_importances.png"] = lambda: vis.plot_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    drawn = {}
    with warnings.catch_warnings(), optuna_log_level(optuna.logging.WARNING if verbose() else optuna.logging.ERROR):
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
        # Optuna's log line about a parameter with one value ("unique value length is less than 2") would
        # be the only Optuna line of a normal run: the figure says as much.
        for name, make in makers.items():
            try:
                axes = make()
            except (ValueError, RuntimeError) as err:  # e.g. importances need 2+ complete trials
                optuna.logging.get_logger("cnnexp").warning("figure %s skipped: %s", name, err)
                continue
            drawn[name] = finish(name, np.ravel(axes)[0].figure, study)
    return drawn


@contextlib.contextmanager
def optuna_log_level(level: int) -> Iterator[None]:
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(level)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


# PED-ANOVA compares the best 10% of complete trials with all of them: with fewer than this many, that top
# group is one or two trials, and the bars say more about them than about the parameters.
FEW_FOR_IMPORTANCES = 20
WHOLE_NUMBER_AXES = {"intermediate_values.png": "epoch", "optimization_history.png": "trial"}


def finish(name: str, fig: Figure, study: optuna.Study) -> Figure:
    """What Optuna's figures leave out: whole-number epoch and trial axes, labels inside the figure, and on
    the importances how many trials they rest on."""
    from cnnexp import plots

    ax = fig.axes[0]
    if name in WHOLE_NUMBER_AXES:
        plots.integer_ticks(ax)
        ax.set_xlabel(WHOLE_NUMBER_AXES[name])
    if name == "param_importances.png":
        complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        caveat = f"\n(fewer than {FEW_FOR_IMPORTANCES}: a rough guide)" if complete < FEW_FOR_IMPORTANCES else ""
        # Optuna titles its charts on the left.
        ax.set_title(f"{ax.get_title(loc='left')}\nPED-ANOVA over {complete} complete trials{caveat}", loc="left",
                     fontsize=10)
        plots.fit_labels(fig)  # only here: on the slice plot, whose colour bar Optuna places itself, it squeezes
    return fig


def log_study_settings(config: TuneConfig) -> None:
    """The tune config and the search space on the active (parent) run; the storage without its password."""
    settings = study_settings(config)
    log_config(dataclasses.replace(config, storage=settings["storage"]))
    # objective is a config field (best, last); study.json spells it out ("maximize best epoch's val_accuracy").
    log_params({k: v for k, v in settings.items() if k not in ("storage", "sampler", "pruner", "objective", "study_name")})
    log_dict(settings, "study.json")


def log_outcome(study: optuna.Study) -> dict:
    """The study's summary, counts and figures on the active (parent) run."""
    result = summary(study)
    set_tags({tags.STUDY_STATUS: tags.STUDY_COMPLETE})
    log_metrics({k: v for k, v in result.items() if k.startswith("trials_") or k == "best_value"})
    if "best_params" in result:
        log_params({f"best_{k}": v for k, v in result["best_params"].items()} | {"best_trial": result["best_trial"]})
    log_dict(result, "summary.json")
    log_trials_table(study, result)
    for name, fig in figures(study).items():
        log_figure(fig, name)
    return result


def log_trials_table(study: optuna.Study, result: dict) -> None:
    """trials.csv: one row per trial with its MLflow run and model; the best trial's model id as a tag."""
    trials = trials_table(study)
    trials["mlflow_model_id"] = [model_id_of(run_id) if isinstance(run_id, str) else None for run_id in trials["mlflow_run_id"]]
    log_csv(trials, "trials.csv")
    if "best_trial" in result:
        best_model_id = trials.loc[trials["number"] == result["best_trial"], "mlflow_model_id"].iloc[0]
        if best_model_id:
            set_tags({tags.BEST_MODEL_ID: best_model_id})


def summarise_on_parent(study: optuna.Study, parent_run_id: str) -> dict:
    """What a worker writes when it sees a `tune --workers 0` study reach its target: the summary that
    tune could not write, on the parent run it left open."""
    with tracked_run(run_id=parent_run_id, nested=False):
        return log_outcome(study)
