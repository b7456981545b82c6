"""`seqtrain tune`: hyperparameter search on Optuna (TPE sampler; percentile or Hyperband pruner).

Each trial is an ordinary seqtrain run in `runs/<study>/trial-NNNN` (config.yaml, checkpoints,
metrics.jsonl). Every evaluation is reported to the pruner through `train(should_stop=...)`, at its
fraction of the trial's planned steps (pruner.py says why); a pruned trial stops right after that
evaluation, and its checkpoints are deleted (it is never resumed; `--keep-pruned` keeps them). The
study lives in a database (SQLite in the study folder by default), so:

- killing `tune` and running the same command again continues the study: finished trials stay,
  and a trial that was running in a process that is gone, or that Ctrl-C stopped (also in a process
  that lives on), is resumed from its `last/` checkpoint (same trial number, same parameters), so no
  trial is lost or run twice; Ctrl-C while a trial's result is being stored waits for it;
- several `tune` processes given the same `--storage` and `--study` share one study (`--jobs J`
  starts J of them on this machine, each with its share of the cores).

`--trials N` counts every trial of the study (finished, pruned, failed and running), so a rerun
tops the study up to N. A trial that raises (a bad combination of values, out of memory) is
recorded as FAIL with its error, and the study goes on; a full disk instead stops the study with the
trial left to resume, since every later trial would fail the same way.

The modules, in the order a study uses them: options (what tune is asked, and a worker's command
line), space (the search space, checked against the config schema), storage (the study's database),
study (the command: the study made or continued), trial (one process's trials), workers (--jobs),
pruner (the percentile pruner at equal fractions of training) and report (the table, best.yaml, the
figures). optuna is imported inside functions only, but by pruner.py, which is imported when a study
is made: the space is validated, and this package imported, without it.
"""

from __future__ import annotations

from seqtrain.tune.options import INSTALL_HINT, PRUNE_AFTER, PRUNERS, Options, require_optuna
from seqtrain.tune.space import DEFAULT_SPACE, Param, load_space, parse_space, trial_config
from seqtrain.tune.storage import open_storage, storage_label
from seqtrain.tune.study import MAXIMIZE, check_study_name, make_pruner, tune
from seqtrain.tune.trial import next_trial, run_trial, work
from seqtrain.tune.workers import run_workers

__all__ = [
    "DEFAULT_SPACE",
    "INSTALL_HINT",
    "MAXIMIZE",
    "PRUNERS",
    "PRUNE_AFTER",
    "Options",
    "Param",
    "check_study_name",
    "load_space",
    "make_pruner",
    "next_trial",
    "open_storage",
    "parse_space",
    "require_optuna",
    "run_trial",
    "run_workers",
    "storage_label",
    "trial_config",
    "tune",
    "work",
]
