"""What `seqtrain tune` is asked to do, and the command line that asks a --jobs worker the same."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqtrain.errors import SeqtrainError

INSTALL_HINT = "seqtrain tune needs Optuna: pip install 'seqtrain[tune]' (or pip install 'optuna>=3.6')."
PRUNERS = ("top15", "quartile", "median", "hyperband", "none")
# The pruner is asked only once a trial has trained this share of its planned steps: a trial's first
# evaluation is near chance and ranks trials by noise.
PRUNE_AFTER = 0.15


def require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise SeqtrainError(INSTALL_HINT) from None


@dataclass(kw_only=True)
class Options:
    """What `seqtrain tune` was asked to do. Each field but the config and its overrides names the
    `seqtrain tune` option that sets it (metadata "flag"): `argv` is built from them."""

    config: Path
    overrides: list[str]
    trials: int = field(metadata={"flag": "--trials"})
    timeout_min: float | None = field(default=None, metadata={"flag": "--timeout"})
    space: Path | None = field(default=None, metadata={"flag": "--space"})
    storage: str | None = field(default=None, metadata={"flag": "--storage"})
    study: str | None = field(default=None, metadata={"flag": "--study"})
    jobs: int = field(default=1, metadata={"flag": "--jobs"})
    # A name from PRUNERS, or an optuna pruner object (Python API; its steps are thousandths of a
    # trial's planned steps, pruner.progress).
    pruner: Any = field(default="top15", metadata={"flag": "--pruner"})
    # False in the worker processes that --jobs starts
    report: bool = field(default=True, metadata={"flag": "--no-report"})
    # TPE's seed; offset by the trials already stored, so a rerun does not repeat them
    seed: int | None = field(default=None, metadata={"flag": "--seed"})
    # A pruned trial is never resumed, and most trials are pruned: their checkpoints would fill the
    # disk for nothing.
    keep_pruned: bool = field(default=False, metadata={"flag": "--keep-pruned"})

    def argv(self) -> list[str]:
        """The arguments of `seqtrain tune` that ask for these options (what a --jobs worker is started
        with): the config, its overrides, then each field's flag, with its value, or alone for a
        true/false field that is not at its default; a field left at None is left out."""
        args = [str(self.config), *self.overrides]
        for f in dataclasses.fields(self):
            if f.name in ("config", "overrides"):
                continue
            flag, value = f.metadata["flag"], getattr(self, f.name)
            if isinstance(f.default, bool):
                if value != f.default:
                    args.append(flag)
            elif value is not None:
                args += [flag, str(value)]
        return args
