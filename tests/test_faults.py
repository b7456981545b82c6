"""Fault injection: signals, kills during saves, a full disk, hostile files and inputs."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from seqtrain import checkpoint
from seqtrain.cli import app
from seqtrain.config import load_config, to_dict
from seqtrain.errors import CheckpointError
from seqtrain.machine import REPEAT_WINDOW
from seqtrain.train import train
from tests.conftest import ROOT, synthetic_rows, tiny_config, write_hub_folder, write_yaml

runner = CliRunner()


def write_config(tmp_path: Path, data: Path, out: str, **sections: dict) -> Path:
    cfg = tiny_config(data, tmp_path / out, **sections)
    path = tmp_path / f"{out}.yaml"
    write_yaml(path, cfg)
    return path


def start(config: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "seqtrain", "train", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_step(run: Path, step: int, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        trace = run / "trained-examples.tsv"
        if (
            trace.exists()
            and trace.stat().st_size
            and int(trace.read_text().splitlines()[-1].split("\t")[0]) >= step
        ):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


@pytest.mark.subprocess
def test_sigterm_saves_last_and_resume_is_exact_with_no_replay_or_gap(
    tiny_data: Path, tmp_path: Path
) -> None:
    train_cfg = {"epochs": 2, "eval_every": 1000, "trace_examples": True}
    train(tiny_config(tiny_data, tmp_path / "straight", train=train_cfg))  # the reference, in this process

    cfg = write_config(tmp_path, tiny_data, "stopped", train=train_cfg)
    proc = start(cfg)
    wait_for_step(tmp_path / "stopped", 20, proc)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "--resume" in err and "Traceback" not in err
    stopped_at = json.loads((tmp_path / "stopped" / "last" / "state.json").read_text())["step"]
    assert 20 <= stopped_at < 76
    proc = start(cfg, "--resume")
    assert proc.wait(timeout=300) == 0, proc.communicate()

    a = (tmp_path / "straight" / "trained-examples.tsv").read_text().splitlines()
    b = (tmp_path / "stopped" / "trained-examples.tsv").read_text().splitlines()
    assert a == b, "the interrupted-plus-resumed run trained on exactly the same examples, in order"
    hashes = [line.split("\t")[1] for line in a]
    assert len(hashes) == 2 * 600 and len(set(hashes[:600])) == len(set(hashes[600:]))
    assert (tmp_path / "straight" / "last" / "model.safetensors").read_bytes() == (
        tmp_path / "stopped" / "last" / "model.safetensors"
    ).read_bytes()


@pytest.mark.subprocess
def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(
    tiny_data: Path, tmp_path: Path
) -> None:
    """A checkpoint every step, killed at random moments (many during a save)."""
    cfg = write_config(tmp_path, tiny_data, "run", train={"epochs": 3, "eval_every": 1})
    run = tmp_path / "run"
    rng = random.Random(0)
    resumed = False
    for _ in range(5):
        proc = start(cfg, *(["--resume"] if resumed else []))
        deadline = time.time() + 120
        while not (run / "last").exists() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.kill()
        proc.wait()
        ckpt, _warnings = checkpoint.find(run, "last")
        checkpoint.load(ckpt)  # verified and readable
        resumed = True
    proc = start(cfg, "--resume")
    assert proc.wait(timeout=300) == 0, proc.communicate()


def test_full_disk_during_save_keeps_previous_checkpoint(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", train={"max_steps": 10, "eval_every": 5})
    import seqtrain.checkpoint as ck

    real = ck.save_file
    calls = {"n": 0}

    def flaky(tensors: dict, path: str, metadata: dict | None = None) -> None:
        calls["n"] += 1
        if calls["n"] > 4:  # the second checkpoint's files
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", flaky)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is untouched"):
        train(cfg)
    ckpt, warnings = checkpoint.find(tmp_path / "run", "last")
    assert ckpt.name == "step-00000005" and not warnings
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_resume_without_checkpoint_is_a_clear_error(tiny_data: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, tiny_data, "never")
    result = runner.invoke(app, ["train", str(cfg), "--resume"])
    assert result.exit_code != 0 and "nothing to resume" in result.output


def test_resume_with_changed_lr_is_allowed(tiny_data: Path, tmp_path: Path) -> None:
    train(tiny_config(tiny_data, tmp_path / "run", train={"max_steps": 5}))
    report = train(
        tiny_config(tiny_data, tmp_path / "run", train={"max_steps": 10, "lr": 0.005}), resume=True
    )
    assert json.loads((tmp_path / "run" / "last" / "state.json").read_text())["step"] == 10 and report


def test_predict_and_eval_refuse_a_pickled_model(tiny_data: Path, tmp_path: Path) -> None:
    import pickle

    train(tiny_config(tiny_data, tmp_path / "run", train={"max_steps": 3}))
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    for link in ("best", "last"):
        (tmp_path / "run" / link / "model.safetensors").resolve().write_bytes(pickle.dumps(Exploit()))
    for cmd in (["eval", str(tmp_path / "run")], ["predict", str(tmp_path / "run"), "hello"]):
        result = runner.invoke(app, cmd)
        assert result.exit_code != 0 and "Traceback" not in result.output
    assert not marker.exists()


def test_predict_reports_undecodable_lines_and_keeps_order(tiny_data: Path, tmp_path: Path) -> None:
    train(tiny_config(tiny_data, tmp_path / "run", train={"max_steps": 3}))
    txt = tmp_path / "in.txt"
    txt.write_bytes(b"first text\n\xff\xfe broken\nthird text\n")
    result = runner.invoke(app, ["predict", str(tmp_path / "run"), "--input", str(txt)])
    assert result.exit_code == 0
    assert [json.loads(line)["text"] for line in result.stdout.splitlines()] == ["first text", "third text"]
    assert "line 2: not valid UTF-8" in result.output
    strict = runner.invoke(app, ["predict", str(tmp_path / "run"), "--input", str(txt), "--strict"])
    assert strict.exit_code == 1 and "line 2" in strict.output


@pytest.mark.subprocess
@pytest.mark.subprocess
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_signal_to_the_whole_process_group_with_workers_saves_last(
    tiny_data: Path, tmp_path: Path, signum: int
) -> None:
    """`kill -- -PGID` (systemd, Kubernetes) and closing the terminal signal every process of the group,
    DataLoader workers included: the run must still save last/ and exit 128 + signum, no traceback."""
    cfg = tmp_path / "group.yaml"
    cfg.write_text(
        yaml.safe_dump(
            to_dict(
                tiny_config(
                    tiny_data,
                    tmp_path / "group",
                    data={"num_workers": 2},
                    train={"epochs": 20, "eval_every": 1000, "trace_examples": True},
                )
            )
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "seqtrain", "train", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    wait_for_step(tmp_path / "group", 10, proc)
    os.killpg(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in out + err
    assert json.loads((tmp_path / "group" / "last" / "state.json").read_text())["step"] >= 10


@pytest.mark.subprocess
def test_the_printed_resume_command_keeps_the_overrides_and_resumes(tiny_data: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, tiny_data, "hint", train={"epochs": 20, "trace_examples": True})
    proc = start(cfg, "train.log_every=7", f"output_dir={tmp_path / 'elsewhere'}")
    wait_for_step(tmp_path / "elsewhere", 5, proc)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    hint = " ".join(err.split("Resume with:", 1)[1].split())  # rich wraps long lines
    assert hint.startswith("seqtrain train ") and "train.log_every=7" in hint and "--resume" in hint
    args = shlex.split(hint)[2:]
    resumed = start(Path(args[0]), *args[1:], "train.max_steps=30")
    _out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "nothing to resume" not in err and "resuming" in err


# --------------------------------------------------------------------------- stopping with data workers

# How long a stopped run may take to save last/ and exit, whatever it was doing when the signal came.
STOP_WITHIN = 30


def start_group(workdir: Path, fault: str | None, *argv: str) -> subprocess.Popen[str]:
    """`seqtrain ARGV...` under tests/fault_entry.py with FAULT (or none), as the leader of its own process
    group (as systemd and Kubernetes run a service), pinned to one core where the machine allows it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    entry = ["seqtrain"] if fault is None else ["tests.fault_entry", fault]
    return subprocess.Popen(
        [sys.executable, "-m", *entry, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=workdir,
        start_new_session=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
    )


def wait_for_marker(folder: Path, prefix: str, proc: subprocess.Popen[str], timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted(folder.glob(f"{prefix}*")) if folder.is_dir() else []
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no {prefix}* file in {folder} in time")


def group_alive(pgid: int) -> list[int]:
    """The processes of group `pgid` still running (zombies, already dead, are not counted)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def stop_group(proc: subprocess.Popen[str], signum: int) -> tuple[str, str]:
    """Signal the whole group; the run must exit within STOP_WITHIN seconds and leave no process behind
    (the group is killed here in any case, so a failing test leaves nothing running)."""
    os.killpg(proc.pid, signum)
    try:
        out, err = proc.communicate(timeout=STOP_WITHIN)
        deadline = time.time() + 5
        while group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.05)
        left = group_alive(proc.pid)
        assert not left, f"processes left running after the run exited: {left}"
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"still running {STOP_WITHIN} s after {signal.Signals(signum).name} to its process group"
        ) from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return out, err


def assert_stopped(proc: subprocess.Popen[str], out: str, err: str, signum: int, run: Path) -> int:
    """Exited 128 + signum with last/ saved, no traceback; the step of last/."""
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in out + err and "--resume" in err, err[-3000:]
    ckpt, _warnings = checkpoint.find(run, "last")
    checkpoint.load(ckpt)
    return int(json.loads((ckpt / "state.json").read_text())["step"])


def group_config(tmp_path: Path, tiny_data: Path, **sections: dict[str, Any]) -> Path:
    """A run in tmp_path/run with 2 data workers that would train for long."""
    train = {"epochs": 50, "eval_every": 1000, **sections.pop("train", {})}
    cfg = tiny_config(tiny_data, tmp_path / "run", data={"num_workers": 2}, train=train, **sections)
    path = tmp_path / "run.yaml"
    write_yaml(path, cfg)
    return path


@pytest.mark.subprocess
@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("after", "signum"),
    [(0, signal.SIGTERM), (3, signal.SIGHUP)],
    ids=["first-batch-sigterm", "mid-epoch-sighup"],
)
def test_group_signal_while_a_data_worker_hangs_still_stops_in_time(
    tiny_data: Path, tmp_path: Path, after: int, signum: int
) -> None:
    """A worker stuck in its work (a slow read, a starved core) must not keep the run from stopping: the
    wait for its batch ends, last/ is saved, and the workers are ended, not waited for."""
    cfg = group_config(tmp_path, tiny_data)
    proc = start_group(tmp_path, f"stall-worker={after}@{tmp_path / 'marks'}", "train", str(cfg))
    wait_for_marker(tmp_path / "marks", "stalled-", proc)
    time.sleep(0.5)  # the main process now waits for the stalled worker's batch
    out, err = stop_group(proc, signum)
    assert_stopped(proc, out, err, signum, tmp_path / "run")


@pytest.mark.subprocess
@pytest.mark.subprocess
def test_group_signal_while_data_workers_start_does_not_kill_them(tiny_data: Path, tmp_path: Path) -> None:
    """A group signal that reaches a worker before seqtrain's own set-up in it (it ignores the stop
    signals from then on) must not kill the worker, which would end the run with an error."""
    cfg = group_config(tmp_path, tiny_data)
    proc = start_group(tmp_path, f"slow-worker-start={tmp_path / 'marks'}", "train", str(cfg))
    wait_for_marker(tmp_path / "marks", "starting-", proc)
    out, err = stop_group(proc, signal.SIGTERM)
    assert_stopped(proc, out, err, signal.SIGTERM, tmp_path / "run")


@pytest.mark.subprocess
@pytest.mark.subprocess
@pytest.mark.parametrize("moment", ["save", "evaluation"])
def test_group_signal_during_a_save_or_an_evaluation_stops_in_time(
    tiny_data: Path, tmp_path: Path, moment: str
) -> None:
    cfg = group_config(tmp_path, tiny_data, train={"eval_every": 5})
    fault, prefix = ("slow-save", "saving-") if moment == "save" else ("slow-eval", "evaluating-2")
    proc = start_group(tmp_path, f"{fault}=1@{tmp_path / 'marks'}", "train", str(cfg))
    mark = wait_for_marker(tmp_path / "marks", prefix, proc)
    out, err = stop_group(proc, signal.SIGTERM)
    step = assert_stopped(proc, out, err, signal.SIGTERM, tmp_path / "run")
    if moment == "save":  # the save under way when the signal came was finished, and is last/
        assert step == int(mark.name.split("-")[1])
    else:
        assert step >= 5


def evaluated_steps(run: Path, split: str = "validation") -> list[int]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines if line["split"] == split]


@pytest.mark.subprocess
def test_group_signal_during_a_long_evaluation_abandons_it_and_the_resume_runs_it(
    tiny_data: Path, tmp_path: Path
) -> None:
    """An evaluation of 50 batches of a second each (a large split): the signal ends it at its next batch
    instead of after it, with no eval line and no best/ from it; last/ holds its step, and the resume
    evaluates that step before it trains on."""
    cfg = group_config(tmp_path, tiny_data, train={"eval_every": 5, "batch_size": 2})
    proc = start_group(tmp_path, f"slow-eval-batches=1@{tmp_path / 'marks'}", "train", str(cfg))
    wait_for_marker(tmp_path / "marks", "eval-batch-", proc)
    out, err = stop_group(proc, signal.SIGTERM)
    run = tmp_path / "run"
    assert assert_stopped(proc, out, err, signal.SIGTERM, run) == 5
    assert evaluated_steps(run) == [] and not (run / "best").exists()
    train(load_config(cfg, ["train.max_steps=5"]), resume=True)
    assert evaluated_steps(run) == [5] and (run / "best").exists()


@pytest.mark.subprocess
def test_group_signal_during_a_long_pretrain_evaluation_stops_in_time(tmp_path: Path) -> None:
    """The same for the held-out evaluation of `seqtrain pretrain` (about 40 batches of a second each)."""
    data = write_hub_folder(tmp_path / "texts", {"train": synthetic_rows(6000, 0)})
    pretrain = {"path": None, "max_length": 64, "heldout_fraction": 0.45, "max_heldout_texts": 3000}
    cfg = group_config(tmp_path, data, train={"eval_every": 5}, pretrain={**pretrain, "softmax": "full"})
    proc = start_group(tmp_path, f"slow-eval-batches=1@{tmp_path / 'marks'}", "pretrain", str(cfg))
    wait_for_marker(tmp_path / "marks", "eval-batch-", proc)
    out, err = stop_group(proc, signal.SIGHUP)
    run = tmp_path / "run"
    assert assert_stopped(proc, out, err, signal.SIGHUP, run) == 5
    assert evaluated_steps(run, "heldout") == [] and not (run / "best").exists()


@pytest.mark.subprocess
@pytest.mark.subprocess
def test_second_sigterm_while_saving_exits_at_once_and_keeps_the_previous_checkpoint(
    tiny_data: Path, tmp_path: Path
) -> None:
    cfg = group_config(tmp_path, tiny_data, train={"eval_every": 5})
    marks = tmp_path / "marks"
    proc = start_group(tmp_path, f"slow-save=60@{marks}", "train", str(cfg))
    while not (tmp_path / "run" / "last").exists():  # the first save (step 5) is not slowed
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)  # past step 5: a stop at the step last/ holds has nothing to save, and exits at once
    os.killpg(proc.pid, signal.SIGTERM)
    first = time.time()
    wait_for_marker(marks, "saving-", proc)  # the stop's save (or the next periodic one) hangs halfway
    time.sleep(max(0.0, first + REPEAT_WINDOW + 0.2 - time.time()))  # sooner is the same request
    started = time.time()
    _out, err = stop_group(proc, signal.SIGTERM)
    assert time.time() - started < 10
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    ckpt, _warnings = checkpoint.find(tmp_path / "run", "last")
    checkpoint.load(ckpt)
    assert json.loads((ckpt / "state.json").read_text())["step"] == 5
    resumed = subprocess.run(
        [sys.executable, "-m", "seqtrain", "train", str(cfg), "--resume", "train.max_steps=12"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.subprocess
@pytest.mark.subprocess
def test_group_signal_while_a_pretrain_data_worker_hangs_still_stops_in_time(
    tiny_data: Path, tmp_path: Path
) -> None:
    pretrain = {"path": None, "max_length": 64, "heldout_fraction": 0.05, "softmax": "full"}
    cfg = group_config(tmp_path, tiny_data, pretrain=pretrain)
    proc = start_group(tmp_path, f"stall-worker=2@{tmp_path / 'marks'}", "pretrain", str(cfg))
    wait_for_marker(tmp_path / "marks", "stalled-", proc)
    time.sleep(0.5)
    out, err = stop_group(proc, signal.SIGTERM)
    assert_stopped(proc, out, err, signal.SIGTERM, tmp_path / "run")


@pytest.mark.subprocess
@pytest.mark.subprocess
def test_group_signal_while_a_tune_trial_data_worker_hangs_still_stops_in_time(
    tiny_data: Path, tmp_path: Path
) -> None:
    cfg = group_config(tmp_path, tiny_data)
    (tmp_path / "space.yaml").write_text("train.lr: {low: 1.0e-3, high: 3.0e-2, log: true}\n")
    proc = start_group(
        tmp_path,
        f"stall-worker=2@{tmp_path / 'marks'}",
        "tune",
        str(cfg),
        "--trials",
        "2",
        "--space",
        "space.yaml",
        "--study",
        "group",
    )
    wait_for_marker(tmp_path / "marks", "stalled-", proc)
    time.sleep(0.5)
    out, err = stop_group(proc, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in out + err and "resume" in err, err
    checkpoint.load(checkpoint.find(tmp_path / "runs" / "group" / "trial-0000", "last")[0])


@pytest.mark.subprocess
def test_a_stop_signal_to_tune_jobs_stops_its_workers_and_leaves_the_study_resumable(
    tiny_data: Path, tmp_path: Path
) -> None:
    """`tune --jobs 2` signalled alone (`kill PID`): the workers are told, each saves its trial's last/,
    and tune exits 128 + SIGTERM with no process left; no trial is recorded as failed, and the stopped
    ones are left to resume. (The signal to the whole group is tests/test_tune.py's Ctrl-C case.)"""
    import optuna

    cfg = tmp_path / "run.yaml"  # no data workers here: the tune test with them is above
    train = {"epochs": 50, "eval_every": 5}
    write_yaml(cfg, tiny_config(tiny_data, tmp_path / "run", train=train))
    (tmp_path / "space.yaml").write_text("train.lr: {low: 1.0e-3, high: 3.0e-2, log: true}\n")
    args = ["tune", str(cfg), "--trials", "3", "--space", "space.yaml", "--study", "jobs", "--jobs", "2"]
    proc = start_group(tmp_path, None, *args)
    folder = tmp_path / "runs" / "jobs"
    deadline = time.time() + 120
    while not all((folder / f"trial-000{n}" / "last").exists() for n in (0, 1)):  # both workers training
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)  # tune alone: it must tell its workers
    try:
        out, err = proc.communicate(timeout=STOP_WITHIN)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"tune still running {STOP_WITHIN} s after the signal") from None
    finally:
        time.sleep(0.5)
        left = group_alive(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"processes left running after tune exited: {left}"
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in out + err and "run the same command again" in " ".join(err.split()), err
    study = optuna.load_study(study_name="jobs", storage=f"sqlite:///{folder / 'study.db'}")
    trials = study.get_trials(deepcopy=False)
    assert {t.state.name for t in trials} <= {"COMPLETE", "RUNNING"}, [t.user_attrs for t in trials]
    for t in trials:
        if t.state.name == "RUNNING":  # resumable: its last/ checkpoint is whole
            checkpoint.load(checkpoint.find(folder / f"trial-{t.number:04d}", "last")[0])


def test_the_same_stop_request_arriving_twice_is_not_a_second_signal() -> None:
    """A terminal's hangup reaches a process from the kernel and from the shell: still one request, so the
    run saves last/ instead of exiting at once."""
    from seqtrain.runtime import StopSignals

    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.01)  # handlers run here
        assert stop.signum == signal.SIGHUP
