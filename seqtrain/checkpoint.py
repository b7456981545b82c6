"""Checkpoints that survive kills and never execute code when loaded.

    run_dir/checkpoints/step-00000123/   model.safetensors, optimizer.safetensors, state.json, manifest.json
                                         (+ train-model.safetensors: the raw weights, when model.safetensors
                                          holds their moving average, train.ema_decay)
    run_dir/last -> checkpoints/step-...  (symlink, swapped atomically)
    run_dir/best -> checkpoints/step-...

A checkpoint folder is written under a temporary name, every file fsynced, then renamed into
place; `last` and `best` are symlinks replaced with os.replace. A kill at any moment leaves the
previous checkpoint whole. manifest.json holds the SHA-256 of every file, checked on load.
Tensors are safetensors and everything else JSON: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from seqtrain.errors import CheckpointError

FORMAT = 1


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
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None
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
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
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
        manifest = {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files}
        (tmp / "manifest.json").write_text(json.dumps({"format": FORMAT, "files": manifest}, indent=2))
        with open(tmp / "manifest.json", "rb+") as f:
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # same step saved twice (eval then end of training): replace it whole
            old = ckpt_root / f".old-step-{step:08d}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint step {step} in {ckpt_root}: {e.strerror or e}. "
            "The previous checkpoint is untouched."
        ) from None
    _link(run_dir, "last", final)
    if best:
        _link(run_dir, "best", final)
    _prune(run_dir, keep_last)
    return final


def _prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints plus whatever `last` and `best` point at."""
    keep = {(run_dir / name).resolve() for name in ("last", "best") if (run_dir / name).exists()}
    steps = sorted((run_dir / "checkpoints").glob("step-*"))
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
    for name, entry in manifest.get("files", {}).items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint.")
        if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path} does not match its SHA-256 in manifest.json: the file is truncated or altered.")
    return manifest


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors only: a pickle (or anything else) is refused, never executed."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}); refusing to load it.") from None


def load(ckpt: Path, verified: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None, dict[str, torch.Tensor]]:
    """Verified (model weights, state, optimizer state or None, rng tensors); `verified`: find() just hashed it."""
    if not verified:
        verify(ckpt)
    weights = load_tensors(ckpt / "model.safetensors")
    state = json.loads((ckpt / "state.json").read_text())
    optimizer = None
    if (ckpt / "optimizer.safetensors").exists() and "optimizer" in state:
        optimizer = _unflatten_optimizer(load_tensors(ckpt / "optimizer.safetensors"), state["optimizer"])
    rng = load_tensors(ckpt / "rng.safetensors") if (ckpt / "rng.safetensors").exists() else {}
    return weights, state, optimizer, rng


def find(run_dir: Path, which: str = "best", fallback: bool = True) -> tuple[Path, list[str]]:
    """The checkpoint `which` points at, verified; if it is damaged, the newest good one (with warnings)."""
    warnings: list[str] = []
    candidates: list[Path] = []
    for name in (which, "last", "best"):
        if (run_dir / name).exists():
            candidates.append((run_dir / name).resolve())
    candidates += sorted((run_dir / "checkpoints").glob("step-*"), reverse=True)
    seen: set[Path] = set()
    for ckpt in candidates:
        if ckpt in seen:
            continue
        seen.add(ckpt)
        try:
            verify(ckpt)
            return ckpt, warnings
        except CheckpointError as e:
            if not fallback:
                raise
            warnings.append(f"{e} Falling back to an older checkpoint.")
    if not candidates:
        raise CheckpointError(f"{run_dir} holds no checkpoint (no {which}/ folder). Train first: seqtrain train CONFIG.")
    raise CheckpointError(f"no intact checkpoint in {run_dir}: " + " ".join(warnings))
