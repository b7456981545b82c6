from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from seqtrain import checkpoint
from seqtrain.config import ModelConfig
from seqtrain.errors import CheckpointError
from seqtrain.model import build_model


def saved(
    tmp_path: Path, step: int = 10, best: bool = True, keep_last: int = 1
) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(step)
    model = build_model(ModelConfig(hidden_size=8, embedding_dim=8), 30, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(2, 30, (4, 5)), torch.full((4,), 5)).sum().backward()
    opt.step()
    state = {"step": step, "epoch": 0, "_rng_tensors": {"torch": torch.get_rng_state()}}
    checkpoint.save(tmp_path, step, model, opt, state, best=best, keep_last=keep_last)
    return tmp_path, model, opt


def test_round_trip_restores_weights_and_optimizer(tmp_path: Path) -> None:
    run, model, opt = saved(tmp_path)
    saved_rng = torch.get_rng_state()  # what saved() stored
    torch.rand(3)  # the generator moves on: the round trip must give back the saved state, not today's
    ckpt, warnings = checkpoint.find(run, "last")
    assert warnings == [] and (run / "last").resolve() == ckpt == (run / "best").resolve()
    weights, state, opt_state, rng = checkpoint.load(ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v)
    opt2 = torch.optim.AdamW(model.parameters())
    assert opt_state is not None
    opt2.load_state_dict(opt_state)
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["step"], b["step"])
    assert state["step"] == 10 and torch.equal(rng["torch"], saved_rng)
    assert not torch.equal(rng["torch"], torch.get_rng_state())


def test_bit_flip_is_detected_naming_the_file_and_falls_back(tmp_path: Path) -> None:
    saved(tmp_path, step=10, keep_last=2)
    saved(tmp_path, step=20, best=False, keep_last=2)
    weights = (tmp_path / "last" / "model.safetensors").resolve()
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match its SHA-256"):
        checkpoint.verify(weights.parent)
    ckpt, warnings = checkpoint.find(tmp_path, "last")
    assert ckpt.name == "step-00000010" and "Falling back" in warnings[0]


def test_retention_keeps_best_and_last(tmp_path: Path) -> None:
    saved(tmp_path, step=10, best=True)
    for step in (20, 30, 40):
        saved(tmp_path, step=step, best=False)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step-00000010", "step-00000040"]


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickled_weights_are_refused_and_never_run(tmp_path: Path) -> None:
    saved(tmp_path)
    marker = tmp_path / "pwned"
    target = (tmp_path / "best" / "model.safetensors").resolve()
    target.write_bytes(pickle.dumps({"weight": Exploit(marker)}))
    with pytest.raises(CheckpointError):
        checkpoint.load_tensors(target)
    assert not marker.exists()


def test_interrupted_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    saved(tmp_path, step=10)
    (tmp_path / "checkpoints" / ".tmp-step-00000020-999").mkdir()  # what a kill mid-save leaves
    (tmp_path / "checkpoints" / ".tmp-step-00000020-999" / "model.safetensors").write_bytes(b"partial")
    ckpt, warnings = checkpoint.find(tmp_path, "last")
    assert ckpt.name == "step-00000010" and not warnings
