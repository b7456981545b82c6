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

Only this module (inside functions) and pruner.py import optuna: the space is validated without it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import typing
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

import yaml

from seqtrain import console
from seqtrain.config import (
    SECTIONS,
    Config,
    _suggest,
    describe_type,
    dump_yaml,
    from_dict,
    read_yaml,
    safe_parse,
    to_dict,
)
from seqtrain.errors import ConfigError, DiskFullError, SeqtrainError
from seqtrain.machine import physical_cores

if TYPE_CHECKING:
    import optuna

INSTALL_HINT = "seqtrain tune needs Optuna: pip install 'seqtrain[tune]' (or pip install 'optuna>=3.6')."
SPEC_KEYS = ("low", "high", "log", "step", "choices")
TUNE_SETS = ("name", "output_dir")  # tune names each trial and puts it in the study folder
PRUNERS = ("top15", "quartile", "median", "hyperband", "none")
MAXIMIZE = {"accuracy", "f1_macro", "r2", "spearman"}
# The pruner is asked only once a trial has trained this share of its planned steps: a trial's first
# evaluation is near chance (about 0.58 on SST-2 at 8% of a batch-32 trial) and ranks trials by noise.
PRUNE_AFTER = 0.15

# Used when --space is not given; written to runs/<study>/space.yaml as a starting point to edit.
DEFAULT_SPACE = """\
# Search space of `seqtrain tune`: dotted config keys -> distributions.
#   {low: A, high: B}              uniform between A and B (integers when the key takes integers)
#   {low: A, high: B, log: true}   log-uniform
#   {low: A, high: B, step: S}     A, A+S, A+2S, ... up to B
#   [a, b, c]                      one of these values
train.lr: {low: 3.0e-4, high: 1.0e-2, log: true}
train.batch_size: [32, 64, 128]
train.weight_decay: {low: 1.0e-4, high: 0.1, log: true}
model.cell: [lstm, gru]
model.bidirectional: [true, false]
model.pooling: [last, mean, max, attention]
model.embedding_dim: {low: 64, high: 256, step: 64}
model.hidden_size: {low: 64, high: 320, step: 64}
model.dropout: {low: 0.0, high: 0.5}
model.embedding_dropout: {low: 0.0, high: 0.4}
"""


def require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise SeqtrainError(INSTALL_HINT) from None


# --------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class Param:
    """One dimension of the space: a range (`kind` int or float) or a list of choices."""

    kind: Literal["int", "float", "categorical"]
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """What optuna stores for this dimension in each trial (to compare a study's space with this one)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def describe(self) -> str:
        if self.kind == "categorical":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        low, high, step = (
            _fmt(int(v) if self.kind == "int" else v) for v in (self.low, self.high, self.step or 0)
        )
        return f"{self.kind} {low}..{high}" + (" (log)" if self.log else f" step {step}" if self.step else "")


def _field_type(key: str) -> Any:
    """The annotation of a dotted config key, or a ConfigError with a did-you-mean."""
    valid = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    valid += [f.name for f in dataclasses.fields(Config) if f.name not in SECTIONS]
    if key in SECTIONS:
        raise ConfigError(
            f"{key!r} is a config section; name a key inside it, "
            f"e.g. {key}.{dataclasses.fields(SECTIONS[key])[0].name}."
        )
    if key not in valid:
        raise ConfigError(
            f"unknown config key {key!r}.{_suggest(key, valid)} See `seqtrain config-help` for every key."
        )
    if key in TUNE_SETS:
        raise ConfigError(
            f"{key!r} cannot be searched: tune sets it for each trial (runs/<study>/trial-NNNN)."
        )
    section, _, name = key.rpartition(".")
    return typing.get_type_hints(SECTIONS[section] if section else Config)[name]


def _numeric(tp: Any) -> type | None:
    """int or float when the key takes numbers (null allowed), else None."""
    args = (
        [a for a in get_args(tp) if a is not type(None)]
        if get_origin(tp) in (Union, types.UnionType)
        else [tp]
    )
    return args[0] if len(args) == 1 and args[0] in (int, float) else None


def _with(base: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A deep copy of the raw config with the dotted `key` set to `value`."""
    raw = copy.deepcopy(base)
    node = raw
    *parents, last = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value
    return raw


def _parse_param(key: str, spec: Any, base: dict[str, Any]) -> Param:
    tp = _field_type(key)
    number = _numeric(tp)
    if isinstance(spec, dict):
        for k in spec:
            if k not in SPEC_KEYS:
                raise ConfigError(
                    f"{key}: unknown distribution key {k!r}.{_suggest(str(k), list(SPEC_KEYS))} "
                    f"Use low/high (with log or step) or choices."
                )
        if "choices" in spec:
            if set(spec) != {"choices"}:
                raise ConfigError(
                    f"{key}: choices cannot be combined with {', '.join(k for k in spec if k != 'choices')}."
                )
            spec = spec["choices"]
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{key}: the list of choices is empty.")
        if number is float:  # YAML 1.1 reads 3e-4 (no dot) as a string
            spec = [c if c is None else _number(c, key, "each choice", float) for c in spec]
        param = Param("categorical", choices=tuple(spec))
        values: list[Any] = list(spec)
    elif isinstance(spec, dict):
        if number is None:
            raise ConfigError(
                f"{key} takes {describe_type(tp)}: give a list of choices, e.g. {key}: [a, b], not a range."
            )
        missing = [k for k in ("low", "high") if k not in spec]
        if missing:
            raise ConfigError(f"{key}: a range needs low and high; {' and '.join(missing)} missing.")
        low, high, step = (_number(spec.get(k), key, k, number) for k in ("low", "high", "step"))
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{key}: log must be true or false, got {log!r}.")
        assert low is not None and high is not None
        if low > high:
            raise ConfigError(f"{key}: low ({low}) is above high ({high}).")
        if log and low <= 0:
            raise ConfigError(f"{key}: a log range needs low > 0, got {low}.")
        if log and step is not None:
            raise ConfigError(f"{key}: log and step cannot be combined.")
        if step is not None and step <= 0:
            raise ConfigError(f"{key}: step must be positive, got {step}.")
        param = Param("int" if number is int else "float", low, high, log, step)
        values = [number(low), number(high)]
    else:
        raise ConfigError(
            f"{key}: give a list of choices ([a, b]) or a range ({{low: A, high: B}}), got {spec!r}."
        )
    for value in values:  # each value must make a valid config on its own
        try:
            from_dict(_with(base, key, value))
        except ConfigError as e:
            raise ConfigError(f"{key}: the value {value!r} is not allowed: {e}") from None
    return param


def _number(value: Any, key: str, what: str, number: type) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (number is int and value != int(value))
    ):
        raise ConfigError(
            f"{key}: {what} must be {'an integer' if number is int else 'a number'}, got {value!r}."
        )
    return float(value)


def parse_space(raw: Any, base: dict[str, Any], where: str) -> dict[str, Param]:
    """Validate a parsed space (dotted key -> distribution) against the config schema and `base`."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{where} must map dotted config keys to distributions, "
            "e.g. `train.lr: {low: 1e-4, high: 1e-2, log: true}`."
        )
    try:
        return {str(key): _parse_param(str(key), spec, base) for key, spec in raw.items()}
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_space(path: Path | None, base: dict[str, Any]) -> tuple[dict[str, Param], str]:
    """The space and its YAML text: from `path`, else the default space."""
    if path is None:
        return parse_space(safe_parse(DEFAULT_SPACE), base, "the default space"), DEFAULT_SPACE
    return parse_space(read_yaml(path), base, str(path)), path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- study


@dataclass
class Options:
    """What `seqtrain tune` was asked to do."""

    config: Path
    overrides: list[str]
    trials: int
    timeout_min: float | None = None
    space: Path | None = None
    storage: str | None = None
    study: str | None = None
    jobs: int = 1
    # A name from PRUNERS, or an optuna pruner object (Python API; its steps are thousandths of a
    # trial's planned steps, pruner.progress).
    pruner: Any = "top15"
    report: bool = True  # False in the worker processes that --jobs starts
    seed: int | None = (
        None  # TPE's seed; offset by the trials already stored, so a rerun does not repeat them
    )
    # A pruned trial is never resumed, and most trials are pruned (126 of 153 in BENCHMARKS.md's
    # 60-minute study): their checkpoints (about 28 MB each there) would fill the disk for nothing.
    keep_pruned: bool = False


def _monitor(cfg: Config) -> tuple[str, Literal["maximize", "minimize"]]:
    monitor = (
        cfg.train.monitor
        if cfg.train.monitor != "auto"
        else ("mae" if cfg.model.task == "regression" else "accuracy")
    )
    return monitor, "maximize" if monitor in MAXIMIZE else "minimize"


def make_pruner(pruner: Any) -> optuna.pruners.BasePruner:
    import optuna

    if not isinstance(pruner, str):
        return pruner
    from seqtrain.pruner import PROGRESS, PercentileAtProgressPruner

    # Steps are fractions of each trial's planned steps, in thousandths (pruner.progress).
    if pruner == "top15":  # the default: BENCHMARKS.md (issue 21) compares the rules
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


def storage_for(url: str) -> optuna.storages.BaseStorage:
    import optuna

    # Several processes write one SQLite file: wait for the lock instead of failing at once.
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


BACKENDS = ("sqlite", "postgresql", "mysql")
# The module a database URL's driver imports -> what to pip install for it.
DRIVERS = {
    "psycopg2": "psycopg2-binary",
    "psycopg": "'psycopg[binary]'",
    "MySQLdb": "mysqlclient (or PyMySQL, with a mysql+pymysql:// URL)",
    "pymysql": "PyMySQL",
    "mysql": "mysql-connector-python",
}
URL_FORMS = (
    "sqlite:///relative/path/study.db or sqlite:////absolute/path/study.db for a file, "
    "postgresql://USER:PASSWORD@HOST/DATABASE or mysql+pymysql://... for several machines"
)


def open_storage(url: str, given: bool) -> tuple[optuna.storages.BaseStorage, str]:
    """The study's storage and the URL to show (no password), checked before any trial: a URL that is
    not one, an unknown database, a missing folder, a file that is not SQLite, a missing driver and a
    database that cannot be opened are each a one-line error. `given`: the user's --storage."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"--storage {url!r} is not a database URL; give {URL_FORMS}.") from None
    shown = parsed.render_as_string(hide_password=True)
    backend = parsed.get_backend_name()
    if backend not in BACKENDS:
        raise ConfigError(
            f"--storage {shown!r}: {backend!r} is not a database tune can use ({', '.join(BACKENDS)}); "
            f"give {URL_FORMS}."
        )
    if backend == "sqlite":
        _check_sqlite_file(parsed.database, shown, given)
    try:
        return storage_for(url), shown
    except ImportError as e:
        module = getattr(e.__cause__, "name", None) or getattr(e, "name", None) or parsed.get_driver_name()
        raise SeqtrainError(
            f"--storage {shown!r} needs the Python module {module!r}, which is not installed: "
            f"pip install {DRIVERS.get(module, module)}."
        ) from None
    except SQLAlchemyError as e:
        raise _storage_error(e, shown) from None


def _check_sqlite_file(database: str | None, shown: str, given: bool) -> None:
    what = f"--storage {shown!r}" if given else "the study database"
    if not database or database == ":memory:":
        raise ConfigError(
            f"{what} is an in-memory database: the study would be lost when tune exits (and --jobs workers "
            "would not share it). Name a file: sqlite:///PATH/study.db."
        )
    path = Path(database)
    if path.is_dir():
        raise ConfigError(f"{what}: {path} is a folder; name a file in it, e.g. sqlite:///{path}/study.db.")
    if not path.parent.is_dir():
        raise ConfigError(
            f"{what}: the folder {path.parent} does not exist. Create it, or fix the path "
            "(sqlite:/// and a relative path, sqlite://// and an absolute one)."
        )
    if path.is_file() and path.stat().st_size:
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError as e:
            raise SeqtrainError(f"{what}: cannot read {path}: {e.strerror or e}.") from None
        if head != b"SQLite format 3\x00":
            raise SeqtrainError(
                f"{what}: {path} is not an SQLite database (damaged, or another file). Move it away "
                "(a new study starts there) or give another --storage."
            )


def storage_label(url: str) -> str:
    """The URL as messages show it: without its password."""
    from sqlalchemy.engine import make_url

    return str(make_url(url).render_as_string(hide_password=True))


def _storage_error(e: BaseException, shown: str) -> SeqtrainError:
    """A failed read or write of the study's database as a message; a full disk says what to do."""
    from seqtrain.checkpoint import is_disk_full

    cause = e.__cause__ if e.__cause__ is not None else e
    reason = (str(getattr(cause, "orig", None) or cause).strip().splitlines() or [type(cause).__name__])[0]
    if is_disk_full(e):
        return SeqtrainError(
            f"the study database {shown} could not be written: the disk is full ({reason}). Free some disk "
            "space, then run the same `seqtrain tune` command again: the stored trials are kept, and a "
            "trial that was running resumes from its last checkpoint."
        )
    return SeqtrainError(f"the study database {shown} failed: {reason}.")


def _is_storage_error(e: BaseException) -> bool:
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(e, optuna.exceptions.StorageInternalError | SQLAlchemyError)


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


def _process_start(pid: int) -> str | None:
    """The start time of a process (field 22 of /proc/PID/stat), to tell a live owner from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid())}


def _orphaned(trial: optuna.trial.FrozenTrial) -> bool:
    """A RUNNING trial whose process let it go (Ctrl-C) or, on this machine, is gone (killed, crashed)."""
    owner = trial.user_attrs.get("owner") or {}
    if owner.get("released"):
        return True  # also when the process lives on (tune called from Python) or is on another machine
    if owner.get("host") != socket.gethostname():
        return False  # another machine's trial: it may well be running
    start = _process_start(int(owner.get("pid", 0)))
    return start is None or start != owner.get("pid_start")


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One process of this machine at a time picks its next trial (no two resume the same one)."""
    with open(folder / ".tune.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def next_trial(study: optuna.Study, n_trials: int, folder: Path) -> tuple[optuna.Trial | None, bool]:
    """(trial, resumed): an orphaned RUNNING trial of this machine first, else a new one while the
    study has fewer than `n_trials` trials; (None, False) when it is full."""
    import optuna
    from optuna.trial import TrialState

    with _locked(folder):
        trials = study.get_trials(deepcopy=False)
        for frozen in trials:
            if frozen.state == TrialState.RUNNING and _orphaned(frozen):
                study._storage.set_trial_user_attr(frozen._trial_id, "owner", _owner())
                return optuna.Trial(study, frozen._trial_id), True
        if sum(t.state != TrialState.WAITING for t in trials) >= n_trials:
            return None, False
        # ask() stores the new trial as RUNNING before it returns it: a Ctrl-C in between would leave a
        # trial with no owner, which no later tune may take (it could be another machine's).
        trial = None
        try:
            with _ctrl_c_deferred():
                trial = study.ask()
                trial.set_user_attr("owner", _owner())
        except BaseException:
            if trial is not None:
                _release(trial)
            raise
        return trial, False


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Ctrl-C waits until the block has written the study (a new trial and its owner, a trial's result),
    then raises KeyboardInterrupt: the database is never left halfway. A second Ctrl-C raises at once.
    Only where Ctrl-C raises KeyboardInterrupt (tune() sets that up in the main thread; signal handlers
    cannot be set in other threads, and Ctrl-C is not delivered there)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    pending: list[int] = []

    def later(signum: int, frame: types.FrameType | None) -> None:
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)

    previous = signal.signal(signal.SIGINT, later)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the trial's own progress bar and tables: tune prints one line per evaluation."""
    saved = console.err.quiet, console.out.quiet
    console.err.quiet = console.out.quiet = True
    try:
        yield
    finally:
        console.err.quiet, console.out.quiet = saved


def _say(msg: str) -> None:
    saved = console.err.quiet
    console.err.quiet = False
    console.info(msg)
    console.err.quiet = saved


def trial_config(base: dict[str, Any], params: dict[str, Any], name: str, output_dir: str | None) -> Config:
    raw = copy.deepcopy(base)
    for key, value in params.items():
        raw = _with(raw, key, value)
    raw["name"], raw["output_dir"] = name, output_dir
    return from_dict(raw)


def run_trial(study: optuna.Study, trial: optuna.Trial, resumed: bool, ctx: dict[str, Any]) -> None:
    """Train one trial and tell the study how it ended: COMPLETE, PRUNED or FAIL (with the error)."""
    from optuna.trial import TrialState

    from seqtrain.checkpoint import is_disk_full, remove_all
    from seqtrain.pruner import progress
    from seqtrain.train import Interrupted, train

    n = trial.number
    run_dir = ctx["folder"] / f"trial-{n:04d}"
    params = {key: p.suggest(trial, key) for key, p in ctx["space"].items()}
    shown = " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in params.items())
    monitor = ctx["monitor"]
    seen: dict[str, Any] = {"step": 0, "pruned": False, "evals": 0}
    t0 = time.perf_counter()

    def should_stop(step: int, metrics: dict[str, Any]) -> bool:
        """Report this evaluation at its fraction of the planned steps and ask the pruner."""
        seen["evals"] += 1
        seen["step"] = step
        planned = _planned(run_dir) or step  # run.json is written before the first evaluation
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a resumed trial may repeat an already reported step
            trial.report(float(metrics[monitor]), progress(step, planned))
        seen["pruned"] = step >= PRUNE_AFTER * planned and trial.should_prune()
        _say(
            f"trial {n} eval {seen['evals']} (step {step:,}): {monitor} {metrics[monitor]:.4f}"
            + ("  pruned" if seen["pruned"] else "")
        )
        return bool(seen["pruned"])

    try:
        cfg = trial_config(ctx["base"], params, f"{ctx['study']}-trial-{n:04d}", str(run_dir))
        resume = resumed and (run_dir / "last" / "state.json").exists()
        if resume:  # the steps so far count even if no evaluation is left (stopped after its last one)
            seen["evals"], seen["step"] = _backfill(trial, run_dir, cfg.data.eval_split, monitor)
        else:
            shutil.rmtree(
                run_dir, ignore_errors=True
            )  # a trial killed before its first checkpoint starts over
        _say(f"trial {n} {'resumed from ' + str(run_dir / 'last') if resume else 'started'}: {shown}")
        with _quiet():
            best = train(
                cfg, resume=resume, config_path=str(run_dir / "config.yaml"), should_stop=should_stop
            )
    except Interrupted as e:  # the trial stays RUNNING, released by work(): rerunning tune resumes it
        stopped = SeqtrainError(
            f"trial {n} stopped with its last/ checkpoint saved; run the same `seqtrain tune` "
            "command again to resume it and continue the study."
        )
        stopped.exit_code = e.exit_code
        raise stopped from None
    except Exception as e:  # a bad combination, out of memory, a data error: record it and go on
        if _is_storage_error(e):
            raise  # the study's database, not the trial: tune() says what failed
        if isinstance(e, DiskFullError) or is_disk_full(e):
            # The machine's fault, not the trial's: recorded as failed, every later trial would fail
            # the same way within seconds. Stop instead; the trial stays RUNNING and resumes from last/.
            raise SeqtrainError(
                f"trial {n} stopped: {str(e).rstrip('.')}. Free some disk space (the study needs only "
                "study.db and each trial's metrics.jsonl; the checkpoints/ folders of finished trials "
                f"under {ctx['folder']} can go if you do not need their models), then run the same "
                f"`seqtrain tune` command again: trial {n} resumes from its last checkpoint and the "
                "study continues."
            ) from None
        error = f"{type(e).__name__}: {e}"
        with _ctrl_c_deferred():
            trial.set_user_attr("error", error[:2000])
            _finish(trial, seen, t0, run_dir)
            study.tell(trial, state=TrialState.FAIL)
        _say(f"trial {n} failed: {error}")
        return
    # The run is over: a Ctrl-C now waits until its result is stored. Released instead, the trial would
    # be resumed from last/, and a pruned one would train on past the point where it was pruned.
    with _ctrl_c_deferred():
        planned = _finish(trial, seen, t0, run_dir)
        if seen["pruned"] and planned is not None and seen["step"] >= planned:
            seen["pruned"] = False  # "prune" at the last evaluation: the run is complete, keep its result
        minutes = (time.perf_counter() - t0) / 60
        if seen["pruned"]:
            study.tell(trial, state=TrialState.PRUNED)
            _say(f"trial {n} pruned after {seen['step']:,} steps ({minutes:.1f} min)")
            if not ctx["keep_pruned"]:
                remove_all(run_dir)
        elif not best or monitor not in best:
            trial.set_user_attr("error", f"the run ended without an evaluation of {monitor}")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, float(best[monitor]))
            _say(f"trial {n} finished: {monitor} {best[monitor]:.4f} ({minutes:.1f} min)")


def _release(trial: optuna.Trial) -> None:
    """Mark a stopped trial as free to resume by the next `tune` on this study (it stays RUNNING: a
    finished state could not be resumed), even if this process lives on, as when tune is called from
    Python. A trial already told (Ctrl-C deferred until its result was stored) needs nothing."""
    from optuna.trial import TrialState

    with contextlib.suppress(Exception):  # the database is gone: the dead-process check remains
        if _frozen(trial).state == TrialState.RUNNING:
            trial.set_user_attr("owner", {**_owner(), "released": True})


def _backfill(trial: optuna.Trial, run_dir: Path, split: str, monitor: str) -> tuple[int, int]:
    """A resumed trial: report the evaluations its run logged up to last/ (its process may have died
    between logging one and reporting it); returns how many there were and last/'s step."""
    from seqtrain.pruner import progress

    last = json.loads((run_dir / "last" / "state.json").read_text())["step"]
    values: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line torn by the kill
            record = json.loads(line)
            if record.get("split") == split and record["step"] <= last and monitor in record:
                values[record["step"]] = float(record[monitor])
    reported = _frozen(trial).intermediate_values
    planned = _planned(run_dir) or last
    for step in sorted(values):
        if progress(step, planned) not in reported:
            trial.report(values[step], progress(step, planned))
    return len(values), last


def _finish(trial: optuna.Trial, seen: dict[str, Any], t0: float, run_dir: Path) -> int | None:
    """Steps trained, steps planned and seconds (added up over resumes) for the table and the savings;
    returns the steps planned."""
    trial.set_user_attr("seconds", _frozen(trial).user_attrs.get("seconds", 0.0) + time.perf_counter() - t0)
    trial.set_user_attr("steps", seen["step"])
    planned = _planned(run_dir)
    if planned is not None:
        trial.set_user_attr("planned_steps", planned)
    return planned


def _planned(run_dir: Path) -> int | None:
    """The steps a run will train if nothing stops it (as train() computes them), once run.json exists."""
    with contextlib.suppress(OSError, ValueError, KeyError, yaml.YAMLError):
        spe = json.loads((run_dir / "run.json").read_text())["steps_per_epoch"]
        t = from_dict(read_yaml(run_dir / "config.yaml")).train
        return int(min(t.max_steps or 10**12, t.epochs * spe))
    return None


def _frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The stored state of a trial (its reports and attributes, also those of a previous process)."""
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def work(study: optuna.Study, opts: Options, ctx: dict[str, Any], deadline: float | None) -> None:
    """Run trials until the study has `opts.trials` of them or the deadline passes."""
    while deadline is None or time.time() < deadline:
        trial, resumed = next_trial(study, opts.trials, ctx["folder"])
        if trial is None:
            return
        # From here until the study is told how the trial ended, anything that stops this process (Ctrl-C
        # in training or in tune's own bookkeeping, a database error) hands the trial to the next tune,
        # also when this process lives on and runs tune again (a notebook, a test).
        try:
            run_trial(study, trial, resumed, ctx)
        except BaseException:
            _release(trial)
            raise


# --------------------------------------------------------------------------- the command


def tune(opts: Options) -> int:
    """`seqtrain tune`: returns the exit code (0 when the study has a completed trial)."""
    require_optuna()
    import optuna

    from seqtrain.config import apply_overrides, load_config

    started = time.time()
    # Ctrl-C stops the study (each trial saves last/) even in a process started with SIGINT ignored, as a
    # shell's background job is; --jobs workers, started from here, then get Python's handler too.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
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


def run_workers(opts: Options, study_name: str, url: str, deadline: float | None) -> None:
    """--jobs J: J `seqtrain tune` processes on the same storage, the cores divided between them."""
    threads = max(1, physical_cores() // opts.jobs)
    cmd = [
        sys.executable,
        "-m",
        "seqtrain",
        "tune",
        str(opts.config),
        *opts.overrides,
        "--trials",
        str(opts.trials),
        "--study",
        study_name,
        "--storage",
        url,
        "--jobs",
        "1",
        "--no-report",
        "--pruner",
        str(opts.pruner),
    ]
    if not any(o.startswith("train.num_threads=") for o in opts.overrides):
        cmd.append(f"train.num_threads={threads}")
    if opts.space is not None:
        cmd += ["--space", str(opts.space)]
    if opts.keep_pruned:
        cmd.append("--keep-pruned")
    if deadline is not None:
        cmd += ["--timeout", str(max(0.01, (deadline - time.time()) / 60))]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    console.info(f"--jobs {opts.jobs}: {opts.jobs} processes with {threads} thread(s) each")
    seeds = [[] if opts.seed is None else ["--seed", str(opts.seed + 1000 * i)] for i in range(opts.jobs)]
    procs = [subprocess.Popen(cmd + seed, env=env) for seed in seeds]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # each worker saves its trial's last/ and exits; a rerun resumes them
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise
    bad = [c for c in codes if c != 0]
    if bad:
        console.warn(f"{len(bad)} of {opts.jobs} worker processes exited with {', '.join(map(str, bad))}")


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
