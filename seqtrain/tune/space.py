"""The search space of `seqtrain tune`: dotted config keys -> distributions, checked against the config
schema (without optuna), and the config of a trial drawn from it."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

from seqtrain.config import (
    SECTIONS,
    Config,
    _suggest,
    describe_type,
    from_dict,
    read_yaml,
    safe_parse,
)
from seqtrain.errors import ConfigError

if TYPE_CHECKING:
    import optuna


SPEC_KEYS = ("low", "high", "log", "step", "choices")


TUNE_SETS = ("name", "output_dir")  # tune names each trial and puts it in the study folder


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


def trial_config(base: dict[str, Any], params: dict[str, Any], name: str, output_dir: str | None) -> Config:
    raw = copy.deepcopy(base)
    for key, value in params.items():
        raw = _with(raw, key, value)
    raw["name"], raw["output_dir"] = name, output_dir
    return from_dict(raw)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
