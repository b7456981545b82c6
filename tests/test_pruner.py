"""The median pruner at equal fractions of training (seqtrain/tune/pruner.py), on hand-made curves."""

from __future__ import annotations

import pytest

optuna = pytest.importorskip("optuna")

from optuna.trial import TrialState, create_trial  # noqa: E402

from seqtrain.tune.pruner import PercentileAtProgressPruner, best_so_far_at, progress  # noqa: E402

# Reports in thousandths of each trial's planned steps, as tune makes them (eval_every 50, 10,000 rows,
# 2 epochs): a batch-128 trial (158 steps) evaluates at 316, 633, 949, 1000; a batch-32 trial (626 steps)
# at 80, 160, 240, 319, ... Per evaluation the large batch has seen 4x the examples, so its fourth
# evaluation is its last, while the small batch's fourth comes a third of the way through.
LARGE_BATCH = {316: 0.66, 633: 0.78, 949: 0.80, 1000: 0.80}
SMALL_BATCH = {80: 0.58, 160: 0.63, 240: 0.66, 319: 0.69, 399: 0.72, 1000: 0.84}


def study_with(*curves: dict[int, float], direction: str = "maximize") -> optuna.Study:
    study = optuna.create_study(direction=direction)
    for curve in curves:
        best = max(curve.values()) if direction == "maximize" else min(curve.values())
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=best, intermediate_values=curve))
    return study


def running(curve: dict[int, float]) -> optuna.trial.FrozenTrial:
    return create_trial(state=TrialState.RUNNING, intermediate_values=curve)


def test_progress_is_the_share_of_planned_steps_in_thousandths() -> None:
    assert [progress(s, 626) for s in (50, 200, 600, 626)] == [80, 319, 958, 1000]
    assert progress(0, 626) == 1 and progress(700, 626) == 1000  # clipped to 1..1000


def test_best_so_far_is_interpolated_and_unknown_before_the_first_report() -> None:
    curve = {100: 0.5, 300: 0.7, 500: 0.6}
    assert best_so_far_at(curve, 50, 1.0) is None
    assert best_so_far_at(curve, 200, 1.0) == pytest.approx(0.6)
    assert best_so_far_at(curve, 400, 1.0) == pytest.approx(0.7)  # the best so far, not the 0.65 between
    assert best_so_far_at(curve, 900, 1.0) == pytest.approx(0.7)
    assert best_so_far_at({100: 0.5, 300: 0.3}, 300, -1.0) == pytest.approx(-0.3)  # minimize: lower is better


def test_a_small_batch_trial_is_compared_at_its_share_of_training_not_its_evaluation_number() -> None:
    study = study_with(LARGE_BATCH, LARGE_BATCH, SMALL_BATCH)
    pruner = PercentileAtProgressPruner(50.0, n_startup_trials=3)
    # A small-batch trial a third of the way through. By evaluation number (4th: 0.80, 0.80, 0.69) it
    # is below the median, and also against the one curve with a report at 319 (0.69); at 319
    # thousandths the large batches had 0.66, and it is above. Optuna's MedianPruner, on evaluation
    # numbers, pruned such trials.
    on_par = running({80: 0.57, 160: 0.62, 240: 0.65, 319: 0.67})
    assert not pruner.prune(study, on_par)
    behind = running({80: 0.55, 160: 0.58, 240: 0.60, 319: 0.62})
    assert pruner.prune(study, behind)  # below the median (0.66) at the same share


def test_no_pruning_until_enough_trials_completed_or_where_nothing_is_known() -> None:
    behind = running({80: 0.40, 160: 0.45, 240: 0.47, 319: 0.50})
    assert not PercentileAtProgressPruner(50.0, n_startup_trials=3).prune(
        study_with(LARGE_BATCH, SMALL_BATCH), behind
    )
    assert PercentileAtProgressPruner(50.0, n_startup_trials=2).prune(
        study_with(LARGE_BATCH, SMALL_BATCH), behind
    )
    # At 80 thousandths only the small batch had reported: the median of one curve.
    early = running({80: 0.50})
    assert PercentileAtProgressPruner(50.0, n_startup_trials=1).prune(
        study_with(LARGE_BATCH, SMALL_BATCH), early
    )
    assert not PercentileAtProgressPruner(50.0, n_startup_trials=1).prune(study_with(LARGE_BATCH), early)
    assert not PercentileAtProgressPruner(50.0, n_startup_trials=0).prune(
        study_with(LARGE_BATCH), running({})
    )


def test_minimize_prunes_the_trial_whose_loss_is_above_the_median() -> None:
    losses = {200: 0.9, 600: 0.6, 1000: 0.5}
    study = study_with(losses, losses, losses, direction="minimize")
    pruner = PercentileAtProgressPruner(50.0, n_startup_trials=3)
    assert pruner.prune(study, running({200: 1.0, 400: 0.8}))  # 0.8 above the 0.75 interpolated at 400
    assert not pruner.prune(study, running({200: 1.0, 400: 0.7}))


def test_a_higher_percentile_prunes_more_and_pruned_trials_count_at_their_last_best() -> None:
    study = study_with(LARGE_BATCH, LARGE_BATCH, SMALL_BATCH)
    on_par = running({80: 0.57, 160: 0.62, 240: 0.65, 319: 0.67})  # 0.661, 0.661, 0.69 at 319
    assert not PercentileAtProgressPruner(50.0).prune(study, on_par)
    assert PercentileAtProgressPruner(75.0).prune(study, on_par)  # the 75th percentile is 0.676
    # Two trials pruned early, at 0.60 and 0.62: held there, they pull the reference down at 319.
    for curve in ({160: 0.58, 316: 0.60}, {80: 0.55, 240: 0.62}):
        study.add_trial(create_trial(state=TrialState.PRUNED, intermediate_values=curve))
    assert PercentileAtProgressPruner(75.0).prune(study, on_par)  # the survivors alone: unchanged
    assert not PercentileAtProgressPruner(75.0, count_pruned=True).prune(study, on_par)  # 75th: 0.661
    # tune's named rules on the same study: quartile keeps it (0.67 ≥ 0.661); top15, the default,
    # stops it (85th percentile: 0.661 + 0.4 × (0.69 − 0.661) = 0.673).
    from seqtrain.tune import Options, make_pruner

    assert not make_pruner("quartile").prune(study, on_par)
    assert make_pruner("top15").prune(study, on_par)
    assert Options.__dataclass_fields__["pruner"].default == "top15"
