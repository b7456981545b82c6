"""Checkpoints that survive kills and never execute code when loaded.

    run_dir/checkpoints/step-00000123/   model.safetensors, optimizer.safetensors, state.json, manifest.json
                                         (+ train-model.safetensors: the raw weights, when model.safetensors
                                          holds their moving average, train.ema_decay)
    run_dir/last -> checkpoints/step-...  (symlink, swapped atomically)
    run_dir/best -> checkpoints/step-...

A checkpoint folder is written under a temporary name, every file fsynced, then renamed into
place; `last` and `best` are symlinks replaced with os.replace. A kill at any moment leaves the
previous checkpoint whole. A step saved twice (an evaluation, then a signal or the end of
training) goes to a new folder, step-00000123-1, so no link ever points at a folder being
replaced. manifest.json holds the SHA-256 and size of every file, checked on load, and weights
that are not finite are refused. Tensors are safetensors and everything else JSON: nothing is
unpickled.

A run directory is locked (flock on run_dir/.lock) for as long as one process trains in it;
the kernel drops the lock when that process dies, however it dies. Taking the lock also removes
what killed saves left behind (.tmp-step-* folders, temporary links and files).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from seqtrain.errors import CheckpointError, ConfigError, DiskFullError

FORMAT = 1
REQUIRED_FILES = ("model.safetensors", "state.json")
_STEP_DIR = re.compile(r"step-(\d+)(?:-(\d+))?")


@dataclass(kw_only=True)
class TrainState:
    """Everything besides weights that a resume needs (both loops); state.json's "train_state"."""

    step: int = 0
    epoch: int = 0
    best: float | None = None  # the monitored metric's best value (pretraining: the lowest held-out NLL)
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best one (early stopping)
    positions: dict[str, Any] = field(default_factory=dict)  # this rank's stream position, per worker slot
    next_slot: int = 0  # the worker slot whose batch comes next
    world: int = 1
    # an interrupt after an epoch's last batch leaves that epoch's evaluation to the resume
    last_eval_step: int = -1
    # train.vat_eps with pretrain.path: this rank's place in the endless stream of unlabeled batches
    unlabeled_epoch: int = 0
    unlabeled_position: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], rank: int) -> TrainState:
        """This rank's state from a checkpoint's state.json
        (older ones lack last_eval_step: the saved step)."""
        known = {f.name for f in fields(cls)}
        state = cls(
            **{
                "last_eval_step": saved["step"],
                **{k: v for k, v in saved["train_state"].items() if k in known},
            }
        )
        if "ranks" in saved:  # each rank continues from its own place in the stream(s)
            state.positions, state.next_slot, *unlabeled = saved["ranks"][rank]
            if unlabeled:  # older checkpoints have no unlabeled stream
                state.unlabeled_epoch, state.unlabeled_position = unlabeled
        return state

    def advance(self, position: dict[str, Any], workers: int) -> None:
        """One step trained on the batch that ends at `position`."""
        self.step += 1
        self.positions[str(position["slot"])] = position
        self.next_slot = (position["slot"] + 1) % max(1, workers)

    def next_epoch(self) -> None:
        self.epoch += 1
        self.positions, self.next_slot = {}, 0


# --------------------------------------------------------------------------- atomic files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(f"cannot write {path}: {e.strerror or e}", e) from None
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _link(run_dir: Path, name: str, target: Path) -> None:
    """Point run_dir/name at target atomically (a new symlink renamed over the old one)."""
    tmp = run_dir / f".{name}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, run_dir), tmp)
    os.replace(tmp, run_dir / name)
    _fsync_dir(run_dir)


# --------------------------------------------------------------------------- optimizer <-> flat tensors


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        pid, key = name.split("/", 1)
        state.setdefault(int(pid), {})[key] = t
    for pid, entry in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


# --------------------------------------------------------------------------- save


def save(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    *,
    best: bool,
    keep_last: int,
    train_model: torch.nn.Module | None = None,
) -> Path:
    """Write checkpoints/step-N atomically, point `last` (and `best` if asked) at it, prune old ones.

    `model` holds the weights eval and predict use; `train_model`, when given, the raw weights that
    training continues from (model is then their moving average).
    """
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{step:08d}"
    resave = 0
    while (
        final.exists()
    ):  # same step saved twice: a new folder, so `last`/`best` never point at a missing one
        resave += 1
        final = ckpt_root / f"step-{step:08d}-{resave}"
    tmp = ckpt_root / f".tmp-step-{step:08d}-{os.getpid()}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files: dict[str, bytes | None] = {}
        for name, module in (("model.safetensors", model), ("train-model.safetensors", train_model)):
            if module is not None:
                weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
                save_file(weights, str(tmp / name), metadata={"format": "pt"})
                files[name] = None
        if optimizer is not None:
            opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            state = {**state, "optimizer": opt_meta}
            files["optimizer.safetensors"] = None
        rng = state.pop("_rng_tensors", {})
        if rng:
            save_file(rng, str(tmp / "rng.safetensors"))
            files["rng.safetensors"] = None
        (tmp / "state.json").write_text(json.dumps({"format": FORMAT, **state}, indent=2))
        files["state.json"] = None
        for name in files:
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        manifest = {
            name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files
        }
        (tmp / "manifest.json").write_text(json.dumps({"format": FORMAT, "files": manifest}, indent=2))
        with open(tmp / "manifest.json", "rb+") as f:
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(
            f"could not write checkpoint step {step} in {ckpt_root}: {_reason(e)}. "
            "The previous checkpoint is untouched.",
            e,
        ) from None
    try:
        _link(run_dir, "last", final)
        if best:
            _link(run_dir, "best", final)
    except OSError as e:
        raise _write_error(
            f"wrote {final} but could not point last/best at it: {_reason(e)}. "
            "They still point at the previous checkpoint.",
            e,
        ) from None
    _prune(run_dir, keep_last)
    return final


def _write_error(message: str, e: BaseException) -> CheckpointError:
    """A failed write as CheckpointError, or as DiskFullError when the disk or quota is full."""
    return (DiskFullError if is_disk_full(e) else CheckpointError)(message)


def is_disk_full(e: BaseException) -> bool:
    """An OSError with ENOSPC/EDQUOT, safetensors' text for OS error 28 or 122, or SQLite's "database or
    disk is full" (a study's database); also as the cause of the error raised (optuna wraps SQLite's)."""
    cause: BaseException | None = e
    for _ in range(8):
        if cause is None:
            return False
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if re.search(r"os error (28|122)\b|code: (28|122)\b|database or disk is full", str(cause)):
            return True
        cause = cause.__cause__
    return False


def _reason(e: BaseException) -> str:
    """An OSError's text,
    or safetensors' `IoError(Os { code: 28, ... message: "No space left on device" })`."""
    if isinstance(e, OSError):
        return str(e.strerror or e)
    found = re.search(r'message: "([^"]+)"', str(e))
    return found.group(1) if found else str(e)


def step_dirs(run_dir: Path) -> list[Path]:
    """checkpoints/step-* folders, oldest first (step-00000010 before its re-save step-00000010-1)."""
    found = []
    for p in (run_dir / "checkpoints").glob("step-*"):
        m = _STEP_DIR.fullmatch(p.name)
        if m:
            found.append(((int(m.group(1)), int(m.group(2) or 0)), p))
    return [p for _, p in sorted(found)]


def remove_all(run_dir: Path) -> None:
    """Delete every checkpoint of a run that will not be resumed, the `last`/`best` links first;
    its config, metrics and tokenizer stay."""
    for name in ("last", "best"):
        if (run_dir / name).is_symlink():
            (run_dir / name).unlink()
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def _prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints plus whatever `last` and `best` point at."""
    keep = {(run_dir / name).resolve() for name in ("last", "best") if (run_dir / name).exists()}
    steps = step_dirs(run_dir)
    keep.update(p.resolve() for p in steps[-keep_last:])
    for p in steps:
        if p.resolve() not in keep:
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- load


def verify(ckpt: Path) -> dict[str, Any]:
    """Check the manifest's hashes; return it. Names the file that is missing or altered."""
    manifest_path = ckpt / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path} is missing: the checkpoint is incomplete.") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{manifest_path} is unreadable: {e}") from None
    for name, entry in _manifest_files(manifest, manifest_path).items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint.")
        if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise CheckpointError(
                f"{path} does not match its SHA-256 in manifest.json: the file is truncated or altered."
            )
    return manifest


def _manifest_files(manifest: Any, path: Path) -> dict[str, dict[str, Any]]:
    """manifest["files"], checked to be {file name: {"sha256": hex, "bytes": int}} naming at least the
    weights and state.json: a manifest of another shape would verify nothing."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is malformed: {what}; refusing a checkpoint it cannot vouch for.")

    if not isinstance(manifest, dict):
        raise bad(f"it holds a {type(manifest).__name__}, not a JSON object with a 'files' key")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise bad(
            "no 'files' object (file name -> sha256 and bytes)"
            if files is None
            else "'files' is not an object"
        )
    for name in REQUIRED_FILES:
        if name not in files:
            raise bad(f"'files' does not list {name}")
    for name, entry in files.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise bad(f"{name!r} is not a file name")
        if not isinstance(entry, dict):
            raise bad(f"the entry of {name} is not an object")
        if not isinstance(entry.get("sha256"), str):
            raise bad(f"the entry of {name} has no 'sha256' string")
        if isinstance(entry.get("bytes"), bool) or not isinstance(entry.get("bytes"), int):
            raise bad(f"the entry of {name} has no 'bytes' integer")
    return files


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors only: a pickle (or anything else) is refused, never executed."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}); refusing to load it.") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"{path} holds non-finite values (NaN or inf) in {name!r}: "
                "training diverged before this save, or the file was altered. "
                "Refusing to load it (its predictions would be NaN); use another checkpoint or retrain."
            )
    return tensors


def load(
    ckpt: Path, verified: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None, dict[str, torch.Tensor]]:
    """Verified (model weights, state, optimizer state or None, rng tensors);
    `verified`: find() just hashed it."""
    if not verified:
        verify(ckpt)
    weights = load_tensors(ckpt / "model.safetensors")
    state = json.loads((ckpt / "state.json").read_text())
    optimizer = None
    if (ckpt / "optimizer.safetensors").exists() and "optimizer" in state:
        optimizer = _unflatten_optimizer(load_tensors(ckpt / "optimizer.safetensors"), state["optimizer"])
    rng = load_tensors(ckpt / "rng.safetensors") if (ckpt / "rng.safetensors").exists() else {}
    return weights, state, optimizer, rng


def find(run_dir: Path, which: str = "best") -> tuple[Path, list[str]]:
    """The checkpoint `which` points at, verified; if it is damaged, the newest good one (with warnings)."""
    warnings: list[str] = []
    problems: list[str] = []  # why each candidate was passed over
    candidates: list[Path] = []
    for name in dict.fromkeys((which, "last", "best")):
        link = run_dir / name
        if link.exists():
            candidates.append(link.resolve())
        elif link.is_symlink() and name == which:  # a dangling link: its checkpoint was removed
            problems.append(f"{link} points at {os.readlink(link)}, which is missing.")
    candidates += [p.resolve() for p in reversed(step_dirs(run_dir))]
    seen: set[Path] = set()
    for ckpt in candidates:
        if ckpt in seen:
            continue
        seen.add(ckpt)
        try:
            verify(ckpt)
            return ckpt, warnings + [f"{p} Falling back to an older checkpoint." for p in problems]
        except CheckpointError as e:
            problems.append(str(e))
    if not candidates:
        verb = _VERB.get(run_kind(run_dir) or CLASSIFIER, "pretrain")
        raise CheckpointError(
            f"{run_dir} holds no checkpoint (no {which}/ folder). Train first: seqtrain {verb} CONFIG."
        )
    raise CheckpointError(
        f"no intact checkpoint in {run_dir}: "
        + " ".join(problems)
        + " Restore the checkpoints/ folder from a copy, or train the run again in a new folder."
    )


# --------------------------------------------------------------------------- the run directory's lock

_HELD: dict[Path, IO[str]] = {}  # run directories this process has locked, with the open lock file
CLASSIFIER, LANGUAGE_MODEL = "classifier", "language-model"  # what run.json's "kind" says (train, pretrain)
WORD_VECTORS = "word-vectors"  # run.json's and state.json's "kind" for pretrain.objective: vectors
_VERB = {CLASSIFIER: "train", LANGUAGE_MODEL: "pretrain"}


def run_marker() -> dict[str, Any]:
    """What run.json carries to say seqtrain wrote it: {"seqtrain": {"version": ...}}. A folder is taken
    for a run only with it, never for the mere presence of a file called run.json."""
    from seqtrain import __version__

    return {"seqtrain": {"version": __version__, "format": FORMAT}}


def read_run_info(run_dir: Path) -> dict[str, Any] | None:
    """run.json as a dict, or None when it is missing, unreadable or not a JSON object."""
    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def is_seqtrain_run(run_dir: Path) -> bool:
    """run_dir holds a run.json that seqtrain wrote: with the marker, or (runs written before the marker)
    with the step count and vocabulary size every run.json has, beside a checkpoint's manifest."""
    info = read_run_info(run_dir)
    if info is None:
        return False
    marker = info.get("seqtrain")
    if isinstance(marker, dict) and isinstance(marker.get("version"), str):
        return True
    return (
        all(isinstance(info.get(k), int) for k in ("steps_per_epoch", "vocab_size"))
        and next((run_dir / "checkpoints").glob("step-*/manifest.json"), None) is not None
    )


def run_kind(run_dir: Path) -> str | None:
    """run.json's "kind": CLASSIFIER for `seqtrain train`'s runs (which do not say), LANGUAGE_MODEL or
    another kind for `seqtrain pretrain`'s; None when run_dir is no seqtrain run."""
    info = read_run_info(run_dir)
    if info is None or not is_seqtrain_run(run_dir):
        return None
    kind = info.get("kind")
    return kind if isinstance(kind, str) and kind else CLASSIFIER


def not_a_classifier(run_dir: Path, what: str) -> CheckpointError | None:
    """The error for `what` (eval, predict, ...) given a run that is not a classifier (a pretrain run has
    no labels), saying how to get one; None for a classifier (or a folder that is no seqtrain run)."""
    kind = run_kind(run_dir)
    if kind in (None, CLASSIFIER):
        return None
    name = f"a {kind.replace('-', ' ')} run"
    return CheckpointError(
        f"{run_dir} is {name} (written by `seqtrain pretrain`), not a classifier: {what} needs a "
        f"classifier with labels. Fine-tune it with `model.init_from: {run_dir}` in a train config "
        "(seqtrain init DATA --init-from RUN writes one), then use that run."
    )


def _check_kind(run_dir: Path, kind: str, fresh: bool) -> None:
    """A resume (or a fresh run over checkpoints) of the other verb's run: say which verb it belongs to."""
    found = run_kind(run_dir)
    if found is None or _VERB.get(found, "pretrain") == _VERB[kind] or (fresh and not step_dirs(run_dir)):
        return
    if found != CLASSIFIER:
        raise ConfigError(
            f"output_dir {str(run_dir)!r} holds a {found.replace('-', ' ')} run (written by `seqtrain "
            "pretrain`), not a classifier run: continue it with `seqtrain pretrain CONFIG --resume`, or "
            f"fine-tune from it with `model.init_from: {run_dir}` and another output_dir (or name=...)."
        )
    raise ConfigError(
        f"output_dir {str(run_dir)!r} holds a classifier run (written by `seqtrain train`), not a pretrain "
        "run: continue it with `seqtrain train CONFIG --resume`, or give pretrain another output_dir "
        "(or name=...)."
    )


def lock_run_dir(run_dir: Path, fresh: bool, kind: str | None = None) -> list[str]:
    """Lock run_dir for this process until it exits; return the stale temporary files it removed.

    A second process is refused while the first runs; a lock left by a process that died is free
    (flock locks die with their process). Nothing is created or locked in a folder before it is known to
    be a seqtrain run (run.json with seqtrain's marker) or new or empty: a fresh run refuses a folder
    with other files (output_dir=. next to the user's own files) and a resume refuses one that holds no
    run. A fresh run marks the folder at once (run.json with the marker). `kind` (CLASSIFIER or
    LANGUAGE_MODEL): refuse to resume the other verb's run.
    """
    key = run_dir.resolve()
    if key in _HELD:
        return []
    if run_dir.is_dir() and not is_seqtrain_run(run_dir):
        # a lone .lock (left by an older seqtrain) holds nothing of the user's
        names = sorted(p.name for p in run_dir.iterdir() if p.name != ".lock")
        shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        if names and fresh:
            raise ConfigError(
                f"output_dir {str(run_dir)!r} is a folder seqtrain did not create and it is not empty "
                f"({shown}); training would overwrite files there. Pick a new or empty folder "
                "(output_dir=... or name=...)."
            )
        if names:
            raise ConfigError(
                f"output_dir {str(run_dir)!r} is not a seqtrain run (no run.json written by seqtrain; it "
                f"holds {shown}): there is nothing to resume. Check output_dir (or name), or start a new "
                "run in a new or empty folder without --resume."
            )
    if not fresh and not is_seqtrain_run(run_dir):
        return []  # nothing to resume: the caller says so
    if kind is not None:
        _check_kind(run_dir, kind, fresh)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / ".lock", "a+", encoding="utf-8")  # noqa: SIM115 - held for the life of the process
    except OSError as e:
        raise CheckpointError(f"cannot create the run directory {run_dir}: {_reason(e)}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise CheckpointError(
            f"{run_dir} is in use by another seqtrain process (pid {pid}, holding {run_dir / '.lock'}): "
            "two runs in one folder would mix their files. Wait for it to finish, or pick another output_dir."
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _HELD[key] = f
    if fresh and read_run_info(run_dir) is None:
        try:  # the folder is seqtrain's from now on, also if this run stops before it writes run.json
            write_json_atomic(run_dir / "run.json", run_marker())
        except CheckpointError:
            unlock_run_dir(run_dir)
            raise
    return clean_stale(run_dir)


def unlock_run_dir(run_dir: Path) -> None:
    f = _HELD.pop(run_dir.resolve(), None)
    if f is not None:
        f.close()


def clean_stale(run_dir: Path) -> list[str]:
    """Remove what killed saves leave: checkpoints/.tmp-step-* and .old-step-* folders, temporary links
    and files (.last.tmp-PID, .config.yaml.tmp-PID). Only call it holding the run's lock."""
    removed = []
    stale = [
        *(run_dir / "checkpoints").glob(".tmp-step-*"),
        *(run_dir / "checkpoints").glob(".old-step-*"),
        *run_dir.glob(".*.tmp-*"),
    ]
    for p in stale:
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(str(p.relative_to(run_dir)))
    return sorted(removed)
