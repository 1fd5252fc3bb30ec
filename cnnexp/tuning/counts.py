"""A study's trials counted honestly: a trial stopped by Ctrl-C or a lost worker and queued again is neither a
failure nor an earlier trial of its own; each call of `tune` is numbered.

Optuna keeps such a trial as FAIL plus a WAITING copy (the retry, whose user attr retry_of names it), so
plain state counts say "8 failed" for trials that all ran again, and "20 earlier trials" for 12.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from cnnexp.tracking import tags
from cnnexp.tuning.study import OBJECTIVE


def requeued_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials that were queued again (some later trial retries them)."""
    return {t.user_attrs[tags.RETRY_OF] for t in trials if tags.RETRY_OF in t.user_attrs}


def state_counts(study: optuna.Study) -> dict[str, int]:
    """complete, pruned, failed (for good), requeued (FAIL, queued again), waiting, running, total."""
    trials = study.get_trials(deepcopy=False)
    requeued = requeued_numbers(trials)
    states = Counter(t.state for t in trials)
    failed_again = sum(t.state == TrialState.FAIL and t.number in requeued for t in trials)
    return {"complete": states[TrialState.COMPLETE], "pruned": states[TrialState.PRUNED],
            "failed": states[TrialState.FAIL] - failed_again, "requeued": failed_again,
            "waiting": states[TrialState.WAITING], "running": states[TrialState.RUNNING], "total": len(trials)}


@dataclass(frozen=True)
class CallPlan:
    """What a call of n_trials does to a study: its earlier trials, and how many of its trials are the
    queued ones (asked first: Optuna hands out WAITING trials before sampling new points)."""

    counts: dict[str, int]
    queued: int
    new: int

    @property
    def earlier(self) -> int:
        """Trials of earlier calls (a queued copy is not one: it is counted with the trial it retries)."""
        return self.counts["total"] - self.counts["waiting"]


def plan(study: optuna.Study, n_trials: int) -> CallPlan:
    counts = state_counts(study)
    queued = min(counts["waiting"], n_trials)
    return CallPlan(counts, queued, n_trials - queued)


def earlier_text(plan: CallPlan) -> str:
    """'12 earlier trials (4 complete, 8 stopped and queued again)'."""
    names = (("complete", "complete"), ("pruned", "pruned"), ("failed", "failed"),
             ("requeued", "stopped and queued again"), ("running", "running elsewhere"))
    parts = [f"{plan.counts[key]} {label}" for key, label in names if plan.counts[key]]
    return f"{plan.earlier} earlier trials" + (f" ({', '.join(parts)})" if parts else "")


def running_text(plan: CallPlan) -> str:
    """'running 12: 8 queued again, then 4 new' (or 'running 12 more' when nothing is queued)."""
    if not plan.queued:
        return f"running {plan.new} more"
    left = plan.counts["waiting"] - plan.queued
    return (f"running {plan.queued + plan.new}: {plan.queued} queued again, then {plan.new} new"
            + (f" ({left} stay queued)" if left else ""))


def call_number(study: optuna.Study) -> int:
    """This call of `tune` on the study: 1 for a new study. Studies from before the count had one parent."""
    attrs = study.user_attrs
    return attrs.get("tune_calls", 1 if "mlflow_parent_run_id" in attrs else 0) + 1


def done_count(counts: dict[str, int]) -> int:
    """Trials that have ended for good: complete, pruned or failed (a trial queued again will run again)."""
    return counts["complete"] + counts["pruned"] + counts["failed"]


def status_text(study: optuna.Study, done_before: int, planned: int | None, epochs: int, elapsed_s: float) -> str:
    """'tune: 40 s, 3 of 12 trials done, 8 running (epoch 2 of 5), best val_accuracy 0.8123 (trial 1)'."""
    trials = study.get_trials(deepcopy=False)
    done = done_count(state_counts(study)) - done_before
    running = [t for t in trials if t.state == TrialState.RUNNING]
    reached = max((max(t.intermediate_values, default=0) for t in running), default=0)
    at = f" (epoch {reached} of {epochs} done)" if reached else ""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value, default=None)
    shown = f"{best.value:.4f} (trial {best.number})" if best else "-"
    return (f"tune: {elapsed_s:.0f} s, {done}{f' of {planned}' if planned is not None else ''} trials done, "
            f"{len(running)} running{at}, best {OBJECTIVE} {shown}")
