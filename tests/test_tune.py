"""`seqtrain tune`: a tiny study on a real SST-2 slice end to end (two processes on one SQLite study),
kill and rerun, Ctrl-C and rerun, pruning that stops a trial early (median, Hyperband), failed trials,
and space validation."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from seqtrain.cli import app
from seqtrain.config import load_config
from tests.conftest import REAL_DATA, ROOT

optuna = pytest.importorskip("optuna")
runner = CliRunner()

pytestmark = pytest.mark.skipif(not (REAL_DATA / "sst2").is_dir(), reason="needs the SST-2 data (make data)")

# Tiny GRUs on the first 800 SST-2 sentences: a trial takes about a second.
BASE: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "data": {
        "path": str(REAL_DATA / "sst2"),
        "text_column": "sentence",
        "max_length": 32,
        "chunk_size": 256,
        "num_workers": 0,
        "max_train_examples": 800,
        "max_eval_examples": 200,
    },
    "tokenizer": {"vocab_size": 2000, "min_frequency": 1},
    "model": {"cell": "gru", "embedding_dim": 16, "hidden_size": 16},
    "train": {
        "batch_size": 32,
        "epochs": 1,
        "max_steps": 24,
        "eval_every": 8,
        "lr": 0.01,
        "log_every": 8,
        "num_threads": 1,
    },
}
SPACE = """\
train.lr: {low: 1.0e-3, high: 3.0e-2, log: true}
model.cell: [gru, rnn]
model.hidden_size: {low: 8, high: 24, step: 8}
"""


def _setup(tmp: Path, monkeypatch: pytest.MonkeyPatch, space: str = SPACE, **train: int) -> tuple[str, str]:
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = {**BASE, "train": {**BASE["train"], **train}}
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp / "space.yaml").write_text(space)
    return "base.yaml", "space.yaml"


def _trials(tmp: Path, study: str = "tiny-tune") -> list[Any]:
    url = f"sqlite:///{tmp / 'runs' / study / 'study.db'}"
    return optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)


def _evals(run_dir: Path) -> list[int]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["step"] for x in lines if x["split"] == "validation"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_tiny_study_with_two_processes_and_its_best_config_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, space = _setup(tmp_path, monkeypatch)
    result = runner.invoke(app, ["tune", config, "--trials", "3", "--space", space, "--jobs", "2"])
    assert result.exit_code == 0, result.output
    trials = _trials(tmp_path)
    assert sorted(t.number for t in trials) == [0, 1, 2]
    assert all(t.state.name == "COMPLETE" for t in trials), [(t.state, t.user_attrs) for t in trials]
    assert len({t.user_attrs["owner"]["pid"] for t in trials}) == 2  # both processes of --jobs 2 ran trials
    folder = tmp_path / "runs" / "tiny-tune"
    for t in trials:  # each trial is an ordinary run
        run = folder / f"trial-{t.number:04d}"
        assert (run / "best").exists() and _evals(run) == [8, 16, 24]
        assert load_config(run / "config.yaml").model.hidden_size == t.params["model.hidden_size"]
        assert list(t.intermediate_values) == [333, 667, 1000]  # thousandths of the 24 planned steps
    for name in ("best.yaml", "history.png", "importances.png", "space.yaml"):
        assert (folder / name).stat().st_size > 0, name
    assert "tiny-tune: 3 trials" in result.output and "best: trial" in result.output
    best = max(trials, key=lambda t: t.value)
    cfg = load_config(folder / "best.yaml")
    assert (cfg.train.lr, cfg.model.cell, cfg.model.hidden_size) == (
        best.params["train.lr"],
        best.params["model.cell"],
        best.params["model.hidden_size"],
    )
    trained = runner.invoke(app, ["train", str(folder / "best.yaml")])
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "runs" / "tiny-tune-best" / "best").exists()


@pytest.mark.subprocess
def test_killed_study_continues_without_losing_or_repeating_a_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, space = _setup(tmp_path, monkeypatch, epochs=2, max_steps=40)
    folder = tmp_path / "runs" / "tiny-tune"
    cmd = [
        sys.executable,
        "-m",
        "seqtrain",
        "tune",
        config,
        "--trials",
        "2",
        "--space",
        space,
        "--pruner",
        "none",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (folder / "trial-0001" / "last").exists():  # trial 1 has written its first checkpoint
        assert proc.poll() is None and time.time() < deadline, (
            proc.stderr.read().decode() if proc.stderr else ""
        )
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: t.state.name for t in _trials(tmp_path)}
    assert before == {0: "COMPLETE", 1: "RUNNING"}, before
    first = (folder / "trial-0000" / "metrics.jsonl").read_bytes()

    result = runner.invoke(app, ["tune", config, "--trials", "2", "--space", space, "--pruner", "none"])
    assert result.exit_code == 0, result.output
    trials = _trials(tmp_path)
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert "trial 1 resumed from" in result.output and "trial 0 started" not in result.output
    assert (folder / "trial-0000" / "metrics.jsonl").read_bytes() == first  # trial 0 was not run again
    assert _evals(folder / "trial-0001") == [
        8,
        16,
        24,
        32,
        40,
    ]  # continued from its checkpoint, each eval once
    assert list(trials[1].intermediate_values) == [200, 400, 600, 800, 1000]  # each evaluation once
    again = runner.invoke(app, ["tune", config, "--trials", "2", "--space", space])
    assert again.exit_code == 0 and len(_trials(tmp_path)) == 2  # a full study runs nothing more


@pytest.mark.slow
def test_pruned_trial_stops_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from seqtrain.tune import Options, tune

    config, space = _setup(tmp_path, monkeypatch)
    # Accuracy can never reach 1.01: the pruner stops the trial at its first evaluation.
    code = tune(
        Options(
            config=Path(config),
            overrides=[],
            trials=1,
            space=Path(space),
            pruner=optuna.pruners.ThresholdPruner(lower=1.01),
        )
    )
    assert code == 1  # no trial completed
    (trial,) = _trials(tmp_path)
    assert (
        trial.state.name == "PRUNED"
        and trial.user_attrs["steps"] == 8 < trial.user_attrs["planned_steps"] == 24
    )
    run = tmp_path / "runs" / "tiny-tune" / "trial-0000"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 8 and _evals(run) == [8]
    # a pruned trial is never resumed: its checkpoints go (they filled a disk), its record stays
    left = {p.name for p in run.iterdir()}
    assert not left & {"checkpoints", "last", "best"} and {"config.yaml", "metrics.jsonl"} <= left
    kept = Options(
        config=Path(config), overrides=[], trials=1, space=Path(space), study="kept", keep_pruned=True
    )
    assert tune(dataclasses.replace(kept, pruner=optuna.pruners.ThresholdPruner(lower=1.01))) == 1
    run = tmp_path / "runs" / "kept" / "trial-0000"
    assert {"checkpoints", "last", "best"} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 8


@pytest.mark.slow
def test_failed_trial_is_recorded_and_the_study_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, space = _setup(
        tmp_path, monkeypatch, space="model.pretrained_embeddings: [null, /nonexistent/vectors.txt]\n"
    )
    (tmp_path / "runs" / "tiny-tune").mkdir(parents=True)
    study = optuna.create_study(
        study_name="tiny-tune",
        direction="maximize",
        storage=f"sqlite:///{tmp_path / 'runs' / 'tiny-tune' / 'study.db'}",
    )
    study.enqueue_trial({"model.pretrained_embeddings": "/nonexistent/vectors.txt"})  # fails inside train()
    study.enqueue_trial({"model.pretrained_embeddings": None})
    result = runner.invoke(app, ["tune", config, "--trials", "2", "--space", space])
    assert result.exit_code == 0, result.output
    failed, done = _trials(tmp_path)
    assert failed.state.name == "FAIL" and "vectors.txt" in failed.user_attrs["error"]
    assert done.state.name == "COMPLETE"
    assert "trial 0 failed" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_full_disk_stops_the_study_and_a_rerun_resumes_the_trial_instead_of_failing_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seen in a bench: the disk filled in one trial, and every later trial was recorded as failed
    # within two seconds each, until the study's trials were used up. Now tune stops, and the rerun
    # (after freeing space) resumes that trial from its last checkpoint.
    from safetensors import SafetensorError

    import seqtrain.checkpoint

    config, space = _setup(tmp_path, monkeypatch, epochs=2, max_steps=40)
    save_file = seqtrain.checkpoint.save_file
    disk = {"full": True}

    def fills_in_trial_1(tensors: Any, path: str, *args: Any, **kwargs: Any) -> None:
        if disk["full"] and "trial-0001" in path and "tmp-step-00000016" in path:  # safetensors' own text
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(seqtrain.checkpoint, "save_file", fills_in_trial_1)
    command = ["tune", config, "--trials", "3", "--space", space, "--pruner", "none"]
    result = runner.invoke(app, command)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "trial 1 stopped: could not write checkpoint step 16" in result.output
    assert "Free some disk space" in result.output and "resumes from its last checkpoint" in result.output
    assert [t.state.name for t in _trials(tmp_path)] == ["COMPLETE", "RUNNING"]  # no FAIL, no trial 2

    disk["full"] = False  # space freed
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert [t.state.name for t in _trials(tmp_path)] == ["COMPLETE"] * 3
    assert "trial 1 resumed from" in result.output
    assert _evals(tmp_path / "runs" / "tiny-tune" / "trial-0001") == [8, 16, 24, 32, 40]


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("model.hiden_size: {low: 8, high: 16}\n", "Did you mean 'model.hidden_size'?"),
        ("train.lr: {low: 1.0e-3, hihg: 1.0e-2}\n", "Did you mean 'high'?"),
        ("model.cell: [lstm, gur]\n", "Did you mean 'gru'?"),
        ("model.dropout: {low: 0.1, high: 1.5}\n", "model.dropout must be in [0, 1)"),
        ("model.cell: {low: 1, high: 2}\n", "give a list of choices"),
        ("name: [a, b]\n", "tune sets it"),
    ],
)
def test_bad_space_fails_with_exit_code_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, space: str, message: str
) -> None:
    config, path = _setup(tmp_path, monkeypatch, space=space)
    result = runner.invoke(app, ["tune", config, "--trials", "1", "--space", path])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_default_space_is_valid_and_typed() -> None:
    from seqtrain.tune import load_space

    space, _ = load_space(None, {})
    assert space["train.lr"].kind == "float" and space["train.lr"].log
    assert space["model.hidden_size"].kind == "int" and space["model.cell"].kind == "categorical"


def test_without_optuna_tune_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, _ = _setup(tmp_path, monkeypatch)
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    result = runner.invoke(app, ["tune", config, "--trials", "1"])
    assert result.exit_code == 1 and "pip install 'seqtrain[tune]'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_hyperband_prunes_where_the_median_pruner_would_still_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, space = _setup(tmp_path, monkeypatch, space="train.lr: [3.0e-2, 1.0e-6]\n")
    study = "hyperband-study"  # Optuna puts trials 0-2 of this name in one bracket (crc32 of name_number)

    def enqueue() -> None:  # two trials that learn, then one that cannot move from chance
        shutil.rmtree(tmp_path / "runs" / study, ignore_errors=True)
        (tmp_path / "runs" / study).mkdir(parents=True)
        url = f"sqlite:///{tmp_path / 'runs' / study / 'study.db'}"
        stored = optuna.create_study(study_name=study, direction="maximize", storage=url)
        for lr in (3.0e-2, 3.0e-2, 1.0e-6):
            stored.enqueue_trial({"train.lr": lr})

    enqueue()
    args = ["tune", config, "--trials", "3", "--space", space, "--study", study]
    result = runner.invoke(app, [*args, "--pruner", "hyperband"])
    assert result.exit_code == 0, result.output
    trials = _trials(tmp_path, study)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"], [
        (t.state.name, t.intermediate_values) for t in trials
    ]
    # Hyperband's first rung is at 15% of the training: trial 2 stopped at its first evaluation (33%).
    assert trials[2].user_attrs["steps"] == 8 < trials[2].user_attrs["planned_steps"] == 24
    assert _evals(tmp_path / "runs" / study / "trial-0002") == [8]
    # The median pruner waits for 3 completed trials, so the same study does not prune trial 2.
    enqueue()
    median = runner.invoke(app, [*args, "--pruner", "median"])
    assert median.exit_code == 0, median.output
    assert [t.state.name for t in _trials(tmp_path, study)] == ["COMPLETE"] * 3


@pytest.mark.slow
def test_ctrl_c_mid_trial_leaves_it_resumable_and_a_rerun_in_the_same_process_finishes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import seqtrain.train
    from seqtrain.errors import SeqtrainError
    from seqtrain.tune import Options, tune

    config, space = _setup(tmp_path, monkeypatch, epochs=2, max_steps=40)
    folder = tmp_path / "runs" / "tiny-tune"
    step = seqtrain.train.train_step

    def ctrl_c_in_trial_1(run: Any, batch: Any, lr: float) -> Any:
        if run.cfg.name.endswith("trial-0001") and run.state.step == 10:  # between evaluations 8 and 16
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; train's handler records it
        return step(run, batch, lr)

    monkeypatch.setattr(seqtrain.train, "train_step", ctrl_c_in_trial_1)
    opts = Options(config=Path(config), overrides=[], trials=2, space=Path(space), pruner="none")
    with pytest.raises(SeqtrainError) as stopped:
        tune(opts)
    assert stopped.value.exit_code == 130 and "run the same `seqtrain tune` command again" in str(
        stopped.value
    )
    assert json.loads((folder / "trial-0001" / "last" / "state.json").read_text())["step"] == 11
    trials = _trials(tmp_path)
    assert [t.state.name for t in trials] == ["COMPLETE", "RUNNING"]  # not FAIL: it is resumed below
    first = (folder / "trial-0000" / "metrics.jsonl").read_bytes()

    monkeypatch.setattr(seqtrain.train, "train_step", step)
    assert tune(opts) == 0  # the same process (a notebook, a script) runs it again
    trials = _trials(tmp_path)
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert (folder / "trial-0000" / "metrics.jsonl").read_bytes() == first  # trial 0 was not run again
    assert _evals(folder / "trial-0001") == [8, 16, 24, 32, 40]  # from step 11 on, each evaluation once
    assert list(trials[1].intermediate_values) == [200, 400, 600, 800, 1000]
    assert trials[1].value == max(trials[1].intermediate_values.values())  # its best checkpoint's accuracy


@pytest.mark.slow
@pytest.mark.parametrize("where", ["ask", "finish", "finish-raises"])
def test_ctrl_c_in_tunes_own_bookkeeping_loses_no_trial_and_runs_none_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Ctrl-C outside training, in the same process that then runs tune again: while the study creates
    trial 1 (before it has an owner), or while trial 1's result is stored after its run ended. Where a
    KeyboardInterrupt is raised directly (not a signal), Ctrl-C could not be held back: the trial is
    released and resumed from its last/ checkpoint, which its run had finished."""
    import seqtrain.tune.trial
    from seqtrain.tune import Options, tune

    config, space = _setup(tmp_path, monkeypatch)
    folder = tmp_path / "runs" / "tiny-tune"
    ask, finish = optuna.Study.ask, seqtrain.tune.trial._finish

    def ask_then_ctrl_c(study: Any, *args: Any, **kwargs: Any) -> Any:
        trial = ask(study, *args, **kwargs)  # trial 1 is stored as RUNNING now
        if trial.number == 1:
            os.kill(os.getpid(), signal.SIGINT)  # delivered here, before ask() returns it
        return trial

    def finish_then_ctrl_c(trial: Any, *args: Any) -> Any:
        planned = finish(trial, *args)  # trial 1 has trained all its steps
        if trial.number == 1:
            if where == "finish-raises":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
        return planned

    if where == "ask":
        monkeypatch.setattr(optuna.Study, "ask", ask_then_ctrl_c)
    else:
        monkeypatch.setattr(seqtrain.tune.trial, "_finish", finish_then_ctrl_c)
    opts = Options(config=Path(config), overrides=[], trials=2, space=Path(space), pruner="none")
    with pytest.raises(KeyboardInterrupt):
        tune(opts)
    stopped = _trials(tmp_path)
    if where == "finish":  # the signal waited until trial 1's result was stored
        assert [t.state.name for t in stopped] == ["COMPLETE", "COMPLETE"]
    else:  # trial 1 stays RUNNING, handed over although this process lives on
        assert [t.state.name for t in stopped] == ["COMPLETE", "RUNNING"]
        assert stopped[1].user_attrs["owner"]["released"]
    first = (folder / "trial-0000" / "metrics.jsonl").read_bytes()

    monkeypatch.setattr(optuna.Study, "ask", ask)
    monkeypatch.setattr(seqtrain.tune.trial, "_finish", finish)
    assert tune(opts) == 0
    trials = _trials(tmp_path)
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert (folder / "trial-0000" / "metrics.jsonl").read_bytes() == first  # trial 0 was not run again
    assert _evals(folder / "trial-0001") == [8, 16, 24]  # trial 1 trained once, each evaluation once
    assert list(trials[1].intermediate_values) == [333, 667, 1000]
    assert [(t.user_attrs["steps"], t.user_attrs["planned_steps"]) for t in trials] == [(24, 24)] * 2


@pytest.mark.subprocess
def test_ctrl_c_to_jobs_2_stops_both_workers_and_a_rerun_completes_every_trial_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from seqtrain.tune.trial import _process_start

    # 120 steps a trial: under load, both workers must still be mid-trial when Ctrl-C arrives
    config, space = _setup(tmp_path, monkeypatch, epochs=5, max_steps=120)
    folder = tmp_path / "runs" / "tiny-tune"
    args = [config, "--trials", "3", "--space", space, "--pruner", "none", "--jobs", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "seqtrain", "tune", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        # started with SIGINT ignored, as a shell's background job (and `make test` under nohup) is:
        # tune must still stop on it, and so must its workers between trials
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    deadline = time.time() + 180
    while not all((folder / f"trial-000{n}" / "last").exists() for n in (0, 1)):  # both workers training
        assert proc.poll() is None and time.time() < deadline, (
            proc.stderr.read().decode() if proc.stderr else ""
        )
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the parent and both workers get it
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()
    stopped = _trials(tmp_path)
    owners = [t.user_attrs["owner"] for t in stopped]
    assert len({o["pid"] for o in owners}) == 2  # both workers had a trial
    assert all(_process_start(o["pid"]) is None for o in owners)  # no worker outlives tune
    assert {t.state.name for t in stopped} <= {"COMPLETE", "RUNNING"}  # none recorded as failed or pruned

    result = runner.invoke(app, ["tune", *args[:-2]])
    assert result.exit_code == 0, result.output
    trials = _trials(tmp_path)
    assert [(t.number, t.state.name) for t in trials] == [(n, "COMPLETE") for n in range(3)]
    for t in trials:  # each resumed or run once: every evaluation logged and reported once
        assert _evals(folder / f"trial-{t.number:04d}") == list(range(8, 121, 8)), t.number
        assert list(t.intermediate_values) == [round(1000 * s / 120) for s in range(8, 121, 8)], t.number


@pytest.mark.subprocess
def test_jobs_workers_get_the_options_that_change_what_a_trial_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A --jobs worker is its own `seqtrain tune` process: an option not passed on is silently dropped
    # (a worker would delete pruned checkpoints the user asked to keep, or prune by another rule).
    import seqtrain.tune.workers
    from seqtrain.tune import Options, run_workers

    started: list[list[str]] = []

    class Worker:
        def __init__(self, cmd: list[str], env: dict[str, str], **kwargs: Any) -> None:
            started.append(cmd)

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(seqtrain.tune.workers.subprocess, "Popen", Worker)
    opts = Options(
        config=tmp_path / "c.yaml",
        overrides=["train.epochs=1"],
        trials=5,
        jobs=2,
        pruner="quartile",
        keep_pruned=True,
    )
    run_workers(opts, "s", "sqlite:///s.db", None)
    assert len(started) == 2
    for cmd in started:
        assert "--keep-pruned" in cmd and cmd[cmd.index("--pruner") + 1] == "quartile"
        assert "train.epochs=1" in cmd and cmd[cmd.index("--jobs") + 1] == "1"
    run_workers(dataclasses.replace(opts, keep_pruned=False), "s", "sqlite:///s.db", None)
    assert "--keep-pruned" not in started[-1]


def test_options_argv_is_what_the_command_line_reads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # run_workers starts each worker with Options.argv(): every field must come back from the command line.
    import seqtrain.tune
    from seqtrain.tune import Options

    seen: list[Options] = []
    monkeypatch.setattr(seqtrain.tune, "tune", lambda opts: seen.append(opts) or 0)
    opts = Options(
        config=tmp_path / "c.yaml",
        overrides=["train.epochs=1", "model.cell=gru"],
        trials=3,
        timeout_min=2.5,
        space=tmp_path / "s.yaml",
        storage="sqlite:///s.db",
        study="s",
        jobs=2,
        pruner="median",
        report=False,
        seed=4,
        keep_pruned=True,
    )
    for asked in (opts, Options(config=opts.config, overrides=[], trials=1)):
        result = runner.invoke(app, ["tune", *asked.argv()])
        assert result.exit_code == 0, result.output
        assert seen.pop() == asked


# --------------------------------------------------------------------------- storage, study and options


@pytest.mark.parametrize(
    ("storage", "code", "message"),
    [
        ("sqlite:///{tmp}/nope/study.db", 2, r"the folder .*/nope does not exist"),
        ("bogus://", 2, r"'bogus' is not a database tune can use"),
        ("study.db", 2, r"--storage 'study\.db' is not a database URL; give sqlite:///"),
        ("sqlite:///{tmp}/garbage.db", 1, r"garbage\.db is not an SQLite database"),
        ("sqlite://", 2, r"in-memory database"),
        # SQLAlchemy 2.1's postgresql:// imports psycopg (3); 2.0's psycopg2
        (
            "postgresql://user@localhost/optuna",
            1,
            r"'psycopg2?', which is not installed: pip install '?psycopg",
        ),
    ],
    ids=["missing-folder", "bogus-scheme", "plain-path", "corrupt-file", "in-memory", "no-driver"],
)
def test_a_bad_storage_is_one_line_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, storage: str, code: int, message: str
) -> None:
    if "postgresql" in storage:
        pytest.importorskip("sqlalchemy")
        with contextlib.suppress(ImportError):
            import psycopg  # noqa: F401

            pytest.skip("psycopg is installed")
        with contextlib.suppress(ImportError):
            import psycopg2  # noqa: F401

            pytest.skip("psycopg2 is installed")
    config, space = _setup(tmp_path, monkeypatch)
    (tmp_path / "garbage.db").write_text("my notes, not a database\n")
    url = storage.format(tmp=tmp_path)
    result = runner.invoke(app, ["tune", config, "--trials", "1", "--space", space, "--storage", url])
    assert result.exit_code == code, result.output
    assert re.search(message, " ".join(result.output.split())) and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()
    assert (tmp_path / "garbage.db").read_text() == "my notes, not a database\n"


def test_a_corrupt_default_study_db_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, space = _setup(tmp_path, monkeypatch)
    folder = tmp_path / "runs" / "tiny-tune"
    folder.mkdir(parents=True)
    (folder / "study.db").write_bytes(b"\x00" * 100)
    result = runner.invoke(app, ["tune", config, "--trials", "1", "--space", space])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "the study database: " in result.output and "not an SQLite database" in result.output
    assert not (folder / "trial-0000").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("second_space", "overrides", "message"),
    [
        (SPACE.replace("[gru, rnn]", "[gru, lstm]"), [], r"model\.cell is one of 'gru', 'lstm' there"),
        (SPACE.replace("model.hidden_size: {low: 8, high: 24, step: 8}\n", ""), [], r"model\.hidden_size"),
        (SPACE + "model.dropout: {low: 0.0, high: 0.3}\n", [], r"model\.dropout is new"),
        (SPACE, ["train.max_steps=16"], r"train\.max_steps is 16, was 24"),
    ],
    ids=["choices-changed", "key-removed", "key-added", "base-config-changed"],
)
def test_a_changed_space_or_config_on_an_existing_study_is_refused_before_a_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, second_space: str, overrides: list[str], message: str
) -> None:
    config, space = _setup(tmp_path, monkeypatch)
    first = runner.invoke(app, ["tune", config, "--trials", "1", "--space", space])
    assert first.exit_code == 0, first.output
    (tmp_path / "space.yaml").write_text(second_space)
    result = runner.invoke(app, ["tune", config, *overrides, "--trials", "3", "--space", space])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert re.search(message, text) and "--study NAME" in text and "Traceback" not in result.output
    assert len(_trials(tmp_path)) == 1  # no trial ran
    assert (tmp_path / "runs" / "tiny-tune" / "space.yaml").read_text() == SPACE  # the study's space kept


def test_the_same_study_again_with_jobs_threads_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--jobs workers add train.num_threads: not a change of the study's config."""
    config, space = _setup(tmp_path, monkeypatch)
    assert runner.invoke(app, ["tune", config, "--trials", "1", "--space", space]).exit_code == 0
    result = runner.invoke(app, ["tune", config, "train.num_threads=2", "--trials", "1", "--space", space])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--timeout", "-5"], r"--timeout must be a positive number of minutes, got -5"),
        (["--study", "../x"], r"--study '\.\./x' must be a plain name"),
        (["--study", "{tmp}/abs"], r"--study '.*/abs' must be a plain name"),
    ],
    ids=["negative-timeout", "study-escapes", "study-absolute"],
)
def test_bad_tune_options_are_refused_before_any_folder_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: list[str], message: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    config, space = _setup(work, monkeypatch)
    args = [o.format(tmp=tmp_path) for o in option]
    result = runner.invoke(app, ["tune", config, "--trials", "1", "--space", space, *args])
    assert result.exit_code == 2, result.output
    assert re.search(message, " ".join(result.output.split())) and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert not (work / "runs").exists()


def test_output_dir_is_said_to_be_unused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, space = _setup(tmp_path, monkeypatch)
    result = runner.invoke(
        app, ["tune", config, f"output_dir={tmp_path / 'elsewhere'}", "--trials", "1", "--space", space]
    )
    assert result.exit_code == 0, result.output
    # compared without spaces: rich may fold the long path anywhere (xdist's temporary paths are longer)
    text = "".join(result.output.split())
    assert re.search(r"output_dir\(.*elsewhere\)isnotusedbytune.*runs/tiny-tune", text), result.output
    assert not (tmp_path / "elsewhere").exists()


def test_a_full_disk_under_study_db_is_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    import sqlalchemy.exc

    config, space = _setup(tmp_path, monkeypatch)

    def full(*args: Any, **kwargs: Any) -> None:
        try:
            raise sqlalchemy.exc.OperationalError(
                "INSERT INTO trial_intermediate_values",
                {},
                sqlite3.OperationalError("database or disk is full"),
            )
        except sqlalchemy.exc.OperationalError as e:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from e

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_intermediate_value", full)
    result = runner.invoke(app, ["tune", config, "--trials", "2", "--space", space])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    assert "study.db could not be written: the disk is full (database or disk is full)" in text, text
    assert "run the same `seqtrain tune` command again" in text
    assert [t.state.name for t in _trials(tmp_path)] == ["RUNNING"]  # not FAIL: it resumes


def _ctrl_c_in_the_last_evaluation(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    import seqtrain.train

    evaluate = seqtrain.train.evaluate_and_save

    def and_ctrl_c(run: Any, *args: Any) -> bool:
        if run.state.step == step and not run.cfg.name.endswith("trial-0001"):
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; train's handler records it
        return bool(evaluate(run, *args))

    monkeypatch.setattr(seqtrain.train, "evaluate_and_save", and_ctrl_c)


@pytest.mark.slow
def test_ctrl_c_in_a_trials_last_evaluation_stops_the_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 steps, evaluations at 8 and 16 and the last one at 20, after the loop: a Ctrl-C there stopped
    nothing (every trial ran, exit 0). Now the study stops, and the rerun completes the trial without
    training it again."""
    config, space = _setup(tmp_path, monkeypatch, max_steps=20)
    _ctrl_c_in_the_last_evaluation(monkeypatch, 20)
    command = ["tune", config, "--trials", "2", "--space", space, "--pruner", "none"]
    result = runner.invoke(app, command)
    assert result.exit_code == 130, result.output
    assert [t.state.name for t in _trials(tmp_path)] == ["RUNNING"]
    monkeypatch.undo()
    _setup(tmp_path, monkeypatch, max_steps=20)
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert [t.state.name for t in _trials(tmp_path)] == ["COMPLETE", "COMPLETE"]
    assert _evals(tmp_path / "runs" / "tiny-tune" / "trial-0000") == [8, 16, 20]


def test_ctrl_c_in_trains_last_evaluation_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, _ = _setup(tmp_path, monkeypatch, max_steps=20)
    _ctrl_c_in_the_last_evaluation(monkeypatch, 20)
    result = runner.invoke(app, ["train", config])
    assert result.exit_code == 130 and "Traceback" not in result.output, result.output
    assert "stopped by SIGINT at step 20" in result.output and "--resume" in result.output


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_sigterm_or_sighup_in_tunes_own_bookkeeping_exits_128_plus_signum_and_releases_the_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    """Outside a trial's training a stop signal is held back while the study is written, as Ctrl-C is,
    then ends tune with 128 + signum; the trial it had just stored is left to resume."""
    config, space = _setup(tmp_path, monkeypatch)
    ask = optuna.Study.ask

    def ask_then_signal(study: Any, *args: Any, **kwargs: Any) -> Any:
        trial = ask(study, *args, **kwargs)  # stored as RUNNING, not yet owned
        os.kill(os.getpid(), signum)
        return trial

    def not_handled(sig: int, frame: Any) -> None:
        raise AssertionError(f"{signal.Signals(sig).name} was not handled by tune")

    monkeypatch.setattr(optuna.Study, "ask", ask_then_signal)
    previous = signal.signal(signum, not_handled)  # instead of ending this test process
    try:
        result = runner.invoke(app, ["tune", config, "--trials", "2", "--space", space])
    finally:
        signal.signal(signum, previous)
    assert result.exit_code == 128 + signum, result.output
    assert "run the same command again" in result.output
    trials = _trials(tmp_path)
    assert [t.state.name for t in trials] == ["RUNNING"] and trials[0].user_attrs["owner"]["released"]
