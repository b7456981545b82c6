"""What a finished `seqtrain tune` shows and writes: the table of trials, best.yaml and two figures."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seqtrain import console
from seqtrain.config import dump_yaml
from seqtrain.tune.space import _fmt, trial_config

if TYPE_CHECKING:
    import optuna


def report(study: optuna.Study, base: dict[str, Any], folder: Path, monitor: str) -> int:
    """The table of trials, best.yaml, the two figures and the steps that pruning saved."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    keys = sorted({k for t in trials for k in t.params})
    rows = []
    for t in trials:
        value = (
            t.value
            if t.state == TrialState.COMPLETE
            else (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        )
        steps = t.user_attrs.get("steps")
        planned = t.user_attrs.get("planned_steps")
        rows.append(
            [
                f"{t.number}{' *' if best is not None and t.number == best.number else ''}",
                t.state.name + (f": {t.user_attrs['error'][:60]}" if "error" in t.user_attrs else ""),
                "" if value is None else f"{value:.4f}",
                "" if steps is None else f"{steps:,}" + (f"/{planned:,}" if planned else ""),
                f"{t.user_attrs.get('seconds', 0.0) / 60:.1f}",
                *(_fmt(t.params[k]) if k in t.params else "" for k in keys),
            ]
        )
    short = [k.rsplit(".", 1)[-1] for k in keys]  # the last part of each key, unless two keys share it
    names = [s if short.count(s) == 1 else k for s, k in zip(short, keys, strict=True)]
    console.print_table(
        f"study {study.study_name}: {len(trials)} trials (* best)",
        ["trial", "state", monitor, "steps", "minutes", *names],
        rows,
    )
    trained = sum(t.user_attrs.get("steps", 0) for t in trials)
    planned = sum(t.user_attrs.get("planned_steps", 0) for t in trials if "steps" in t.user_attrs)
    if planned:
        console.info(
            f"steps trained: {trained:,} of {planned:,} planned "
            f"({1 - trained / planned:.0%} saved by pruning and early stopping)"
        )
    plots(study, folder, len(complete))
    if best is None:
        console.error(f"no trial of study {study.study_name!r} completed; see the errors above.")
        return 1
    path = write_best(
        base, best.params, folder, study.study_name, f"{monitor} {best.value:.4f}, trial {best.number}"
    )
    console.info(
        f"best: trial {best.number}, {monitor} {best.value:.4f} ({folder / f'trial-{best.number:04d}'}); "
        f"its config: {path}. Train it with: seqtrain train {path}"
    )
    return 0


def write_best(
    base: dict[str, Any], params: dict[str, Any], folder: Path, study_name: str, what: str
) -> Path:
    cfg = trial_config(base, params, f"{study_name}-best", None)
    path = folder / "best.yaml"
    header = (
        f"# Best config of study {study_name!r} ({what}), written by `seqtrain tune`.\n"
        f"# Train it with: seqtrain train {path}\n"
    )
    path.write_text(header + dump_yaml(cfg), encoding="utf-8")
    return path


def plots(study: optuna.Study, folder: Path, completed: int) -> None:
    """history.png always; importances.png once two trials completed (PED-ANOVA: no scikit-learn needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis
    from optuna.importance import PedAnovaImportanceEvaluator

    figures: list[tuple[str, Any]] = [("history.png", lambda: vis.plot_optimization_history(study))]
    if completed >= 2 and len({k for t in study.trials for k in t.params}) >= 1:
        figures.append(
            (
                "importances.png",
                lambda: vis.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator()),
            )
        )
    for name, draw in figures:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
                ax.figure.savefig(folder / name, dpi=100, bbox_inches="tight")
                plt.close(ax.figure)
            console.info(f"wrote {folder / name}")
        except Exception as e:  # a picture is a bonus; e.g. too few trials for importances
            console.warn(f"could not draw {folder / name}: {type(e).__name__}: {e}")
