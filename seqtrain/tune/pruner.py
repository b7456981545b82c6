"""The pruners of `seqtrain tune`, with trials compared at equal fractions of their training.

tune reports each evaluation at the fraction of its trial's planned steps it was taken at, in
thousandths (`PROGRESS`): 500 is halfway. Trials evaluate at different fractions: with
`eval_every: 50` and 2 epochs of 10,000 rows, a batch-32 trial (626 steps) evaluates at 80, 160,
240, ... and a batch-128 trial (158 steps) at 316, 633, 949 and 1000.

Optuna's MedianPruner compares a trial with the others at the same step number only. Fed evaluation
numbers (what tune did before), it set a batch-32 trial's fourth evaluation (a third of its data
seen) against a batch-128 trial's fourth (all of it), and pruned the small batches that end best,
often the best trial of a study (BENCHMARKS.md and docs/experiments/tune.md replay such studies).
Here the other trials' curves are interpolated at the fraction the trial being judged has reached.

`--pruner top15` (the default) is PercentileAtProgressPruner(85, count_pruned=True): a trial goes on
while it is in the top 15% of all trials so far, pruned ones held at the best they had, so the bar
drops as weak trials are stopped and a slow starter that catches up is not cut near its end.
`--pruner quartile` is the same at the top 25%: it kept the best trial of more replayed studies than
top15 but saved fewer steps. The median of the completed trials alone (`--pruner median`) rises as
pruning removes the weaker ones, and stopped the best trial more often than either
(docs/experiments/tune.md compares the rules).

Only this module of the package imports optuna at its top; the others import it inside functions,
and tune imports this one when a study is made.
"""

from __future__ import annotations

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

PROGRESS = 1000  # the step a report is made at: the fraction of the planned steps, in thousandths


def progress(step: int, planned: int) -> int:
    """The report step of an evaluation at training step `step` of `planned` (1..PROGRESS)."""
    return max(1, min(PROGRESS, round(PROGRESS * step / max(planned, 1))))


def best_so_far_at(values: dict[int, float], at: int, sign: float) -> float | None:
    """sign × the best value a trial had reported by progress `at`, interpolated linearly between its
    reports; None before its first report (it tells nothing there). sign is +1 to maximize, -1 to
    minimize, so a larger result is always better."""
    steps = sorted(values)
    if at < steps[0]:
        return None
    running = np.fmax.accumulate([sign * values[s] for s in steps])  # fmax: a NaN report is skipped
    return float(np.interp(at, steps, running))


class PercentileAtProgressPruner(optuna.pruners.BasePruner):
    """Prune a trial whose best value so far is in the bottom `percentile` percent of the other trials'
    best values at the same fraction of their training; `tune --pruner median` is percentile 50.

    n_startup_trials: no pruning until this many trials have completed (the median needs a few).
    count_pruned: also set the trial against pruned trials, each held at the best it had when it
    stopped. Without them the reference is the survivors alone, and it rises with every trial pruned.
    """

    def __init__(
        self, percentile: float = 50.0, n_startup_trials: int = 3, count_pruned: bool = False
    ) -> None:
        self.percentile = percentile
        self.n_startup_trials = n_startup_trials
        self.count_pruned = count_pruned

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        values = trial.intermediate_values
        if not values:
            return False
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(completed) < self.n_startup_trials:
            return False
        others = completed
        if self.count_pruned:
            others = others + study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
        sign = 1.0 if study.direction == StudyDirection.MAXIMIZE else -1.0
        at = max(values)  # the latest report: where this trial is now
        bests = [best_so_far_at(t.intermediate_values, at, sign) for t in others if t.intermediate_values]
        known = [v for v in bests if v is not None and not np.isnan(v)]
        if not known:
            return False
        mine = [sign * v for v in values.values() if not np.isnan(v)]
        return bool(mine) and max(mine) < float(np.percentile(known, self.percentile))
