"""What a model is judged by, everywhere (compare, the registry's champion rule, tune's best trial): the
val_accuracy its training run linked to it, i.e. that of the epoch whose weights it holds."""
from __future__ import annotations

JUDGED_BY = "val_accuracy"
RANKING_METRIC = f"model_{JUDGED_BY}"  # compare's leaderboard column of it, and its default sort
