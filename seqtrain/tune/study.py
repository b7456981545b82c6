"""`seqtrain tune` itself: the options checked, the study made or continued (the same direction, space
and base config as its trials), its trials run here or in --jobs workers, and the report."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from seqtrain import console
from seqtrain.config import Config, _suggest, monitored, read_yaml, to_dict
from seqtrain.errors import ConfigError
from seqtrain.tune.options import PRUNE_AFTER, PRUNERS, Options, require_optuna
from seqtrain.tune.report import report
from seqtrain.tune.space import Param, _fmt, load_space
from seqtrain.tune.storage import _is_storage_error, _storage_error, open_storage, storage_label
from seqtrain.tune.trial import stop_signals_raise, work
from seqtrain.tune.workers import run_workers

if TYPE_CHECKING:
    import optuna


MAXIMIZE = {"accuracy", "f1_macro", "r2", "spearman"}


def _monitor(cfg: Config) -> tuple[str, Literal["maximize", "minimize"]]:
    monitor = monitored(cfg.train, cfg.model.task == "regression")
    return monitor, "maximize" if monitor in MAXIMIZE else "minimize"


def make_pruner(pruner: Any) -> optuna.pruners.BasePruner:
    import optuna

    if not isinstance(pruner, str):
        return pruner
    from seqtrain.tune.pruner import PROGRESS, PercentileAtProgressPruner

    # Steps are fractions of each trial's planned steps, in thousandths (pruner.progress).
    if pruner == "top15":  # the default: BENCHMARKS.md compares the rules
        return PercentileAtProgressPruner(85.0, n_startup_trials=3, count_pruned=True)
    if pruner == "quartile":
        return PercentileAtProgressPruner(75.0, n_startup_trials=3, count_pruned=True)
    if pruner == "median":
        return PercentileAtProgressPruner(50.0, n_startup_trials=3)
    if pruner == "hyperband":  # rungs at 15% and 45% of the training
        return optuna.pruners.HyperbandPruner(
            min_resource=round(PRUNE_AFTER * PROGRESS), max_resource=PROGRESS, reduction_factor=3
        )
    if pruner == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(
        f"--pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}.{_suggest(pruner, list(PRUNERS))}"
    )


# --------------------------------------------------------------------------- checks of a continued study


def check_study_name(name: str) -> None:
    """--study names a folder in runs/: a plain name, never a path out of it."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    ):
        raise ConfigError(
            f"--study {name!r} must be a plain name (no '/', not '.' or '..', no control characters): "
            "the study's folder is runs/<study>."
        )


def check_same_space(study: optuna.Study, space: dict[str, Param], where: str) -> None:
    """A study keeps the space its trials were drawn from: another one would make optuna fail, or reuse a
    trial with a value the new space does not have."""
    from optuna.trial import TrialState

    wanted = {key: p.distribution() for key, p in space.items()}
    changes: dict[str, str] = {}
    for t in study.get_trials(deepcopy=False):
        for key, dist in t.distributions.items():
            if key not in wanted:
                changes[key] = f"{key} ({_describe(dist)}) is not in it"
            elif dist != wanted[key]:
                changes[key] = f"{key} is {space[key].describe()} there but {_describe(dist)} in the study"
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.distributions:
            for key in wanted.keys() - t.distributions.keys():
                changes[key] = f"{key} is new"
    if changes:
        raise ConfigError(
            f"the search space does not match study {study.study_name!r} in {where}: "
            + "; ".join(changes[k] for k in sorted(changes))
            + ". Give the space the study was started with (runs/<study>/space.yaml holds it) or start "
            "another study (--study NAME)."
        )


def _describe(dist: optuna.distributions.BaseDistribution) -> str:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return "one of " + ", ".join(repr(c) for c in dist.choices)
    low, high = dist.low, dist.high  # type: ignore[attr-defined]
    log, step = dist.log, dist.step  # type: ignore[attr-defined]
    return f"{_fmt(low)}..{_fmt(high)}" + (" (log)" if log else f" step {_fmt(step)}" if step else "")


# Keys that may differ between the processes and machines of one study: tune sets name and output_dir,
# --jobs sets train.num_threads, each machine its device.
PER_PROCESS = ("name", "output_dir", "train.num_threads", "train.device")


def check_same_base(study: optuna.Study, cfg: Config, space: dict[str, Param], where: str) -> None:
    """A study keeps the config it was started with (less the searched keys): trials trained from another
    one would be compared as if they were not. The first run stores it in the study."""
    mine = {
        k: v
        for k, v in json.loads(json.dumps(_flat(to_dict(cfg)))).items()
        if k not in PER_PROCESS and k not in space
    }
    stored = study.user_attrs.get("base_config")
    if not isinstance(stored, dict):
        study.set_user_attr("base_config", mine)
        return
    changed = [k for k in sorted(mine.keys() & stored.keys()) if mine[k] != stored[k]]
    if changed:
        raise ConfigError(
            f"the config differs from the one study {study.study_name!r} in {where} was started with: "
            + "; ".join(f"{k} is {mine[k]!r}, was {stored[k]!r}" for k in changed[:6])
            + ("; ..." if len(changed) > 6 else "")
            + ". Its trials would not be comparable: run it with the same config and overrides, or start "
            "another study (--study NAME)."
        )


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


# --------------------------------------------------------------------------- the command


def tune(opts: Options) -> int:
    """`seqtrain tune`: returns the exit code (0 when the study has a completed trial). Ctrl-C, SIGTERM and
    SIGHUP stop the study (a trial saves last/, --jobs passes them on to its workers) and raise
    KeyboardInterrupt (trial.StopRequested, with the signal's number), also in a process started with
    SIGINT ignored, as a shell's background job is; --jobs workers, started from here, get them too."""
    with stop_signals_raise():
        return _tune(opts)


def _tune(opts: Options) -> int:
    require_optuna()
    import optuna

    from seqtrain.config import apply_overrides, load_config

    started = time.time()
    base_cfg = load_config(opts.config, opts.overrides)  # the config alone must be valid
    base = apply_overrides(read_yaml(opts.config) or {}, list(opts.overrides))
    space, space_text = load_space(opts.space, base)
    if opts.trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {opts.trials}.")
    if opts.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {opts.jobs}.")
    if opts.timeout_min is not None and not opts.timeout_min > 0:
        raise ConfigError(f"--timeout must be a positive number of minutes, got {opts.timeout_min}.")
    if opts.study is not None:
        check_study_name(opts.study)
    pruner = make_pruner(opts.pruner)
    study_name = opts.study or f"{base_cfg.name}-tune"
    folder = Path("runs") / study_name
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    url = opts.storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    if opts.storage is not None:  # checked before anything is written
        storage, shown = open_storage(url, given=True)
    folder.mkdir(parents=True, exist_ok=True)
    if opts.storage is None:
        storage, shown = open_storage(url, given=False)
    if base_cfg.output_dir is not None and opts.report:
        console.warn(
            f"output_dir ({base_cfg.output_dir}) is not used by tune: the study and its trials go in "
            f"{folder} (choose it with --study)."
        )
    try:
        deadline = started + opts.timeout_min * 60 if opts.timeout_min else None
        return _run_study(
            opts, base_cfg, base, space, space_text, pruner, study_name, folder, storage, url, deadline
        )
    except Exception as e:
        if _is_storage_error(e):
            raise _storage_error(e, shown) from None
        raise


def _run_study(
    opts: Options,
    base_cfg: Config,
    base: dict[str, Any],
    space: dict[str, Param],
    space_text: str,
    pruner: Any,
    study_name: str,
    folder: Path,
    storage: optuna.storages.BaseStorage,
    url: str,
    deadline: float | None,
) -> int:
    """tune() once its options, config, space and storage are checked."""
    import optuna

    where = storage_label(url)
    monitor, direction = _monitor(base_cfg)
    study = optuna.create_study(
        study_name=study_name, storage=storage, pruner=pruner, direction=direction, load_if_exists=True
    )
    # constant liar: trials running in parallel spread out instead of sampling the same region
    seed = None if opts.seed is None else opts.seed + len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(constant_liar=True, seed=seed)
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"study {study_name!r} in {where} is set to {study.direction.name.lower()}, but this config's "
            f"train.monitor ({monitor}) wants {direction}: use another --study."
        )
    check_same_space(study, space, where)
    check_same_base(study, base_cfg, space, where)
    study.set_user_attr("monitor", monitor)
    (folder / "space.yaml").write_text(space_text, encoding="utf-8")
    if opts.report:
        done = len(study.get_trials(deepcopy=False))
        console.info(
            f"study {study_name!r} ({where}): {done} trials so far, up to {opts.trials}; "
            f"{monitor} ({direction}), "
            f"pruner {opts.pruner if isinstance(opts.pruner, str) else type(opts.pruner).__name__}, "
            f"{len(space)} parameters: " + "; ".join(f"{k} {p.describe()}" for k, p in space.items())
        )
    if opts.jobs > 1:
        run_workers(opts, study_name, url, deadline)
    else:
        ctx = {"base": base, "space": space, "folder": folder, "study": study_name, "monitor": monitor}
        ctx["keep_pruned"] = opts.keep_pruned
        work(study, opts, ctx, deadline)
    if not opts.report:
        return 0
    return report(study, base, folder, monitor)
