"""Hostile and careless input, through the real command line (issue 17).

Each case runs `seqtrain` with its arguments and checks the exit code, a message that names the key,
file or row at fault, and that no Traceback reaches stdout or stderr. Most run the command through
Typer's runner in this process (`run_in_process`: the same app, without a Python start-up per case,
and an exception escaping the command fails the case as a Traceback would); the cases that need a
second process or a real stdin (`Case.process`) run the installed `seqtrain` as a subprocess. The few
cases that need a fault no file can cause (a full disk, a kill between two renames) call the
function directly.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from seqtrain import checkpoint
from seqtrain.config import to_dict
from seqtrain.errors import CheckpointError
from tests.conftest import ROOT, synthetic_rows, tiny_config, write_hub_folder

EXE = next(
    (
        p
        for p in (ROOT / ".venv" / "bin" / "seqtrain", Path(sys.executable).parent / "seqtrain")
        if p.exists()
    ),
    None,
)


def cli(
    *args: str, cwd: Path | None = None, stdin: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the installed `seqtrain` with one thread; never a Traceback, whatever the exit code."""
    cmd = [str(EXE)] if EXE else [sys.executable, "-m", "seqtrain"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [*cmd, *args], cwd=cwd, input=stdin, capture_output=True, text=True, env=env, timeout=timeout
    )
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


@contextlib.contextmanager
def chdir(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_in_process(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`seqtrain ARGS` through Typer's runner in this process, as `cli` runs it in a subprocess: the exit
    code, stdout and stderr; the consoles 200 columns wide (cli's COLUMNS) so long paths are not folded."""
    from typer.testing import CliRunner

    from seqtrain import console
    from seqtrain.cli import app

    widths = console.out.width, console.err.width
    console.out.width = console.err.width = 200
    try:
        with chdir(cwd):
            result = CliRunner().invoke(app, list(args))
    finally:
        console.out.width, console.err.width = widths
    escaped = result.exception if not isinstance(result.exception, SystemExit | None) else None
    assert escaped is None, "".join(traceback.format_exception(escaped)) if escaped else ""
    proc = subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


def write_config(path: Path, dataset: Path, out: Path | None, **sections: Any) -> Path:
    train = {"max_steps": 2, "log_every": 1, **sections.pop("train", {})}
    data = {"max_eval_examples": 20, **sections.pop("data", {})}
    raw = to_dict(tiny_config(dataset, out or path.parent / "run", train=train, data=data, **sections))
    if out is None:
        raw["output_dir"] = None
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hub_folder(
        tmp_path_factory.mktemp("data") / "tiny",
        {"train": synthetic_rows(120, 0), "validation": synthetic_rows(40, 1)},
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A tiny run with two checkpoints: step-00000002 and step-00000004 (last)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = write_config(
        tmp / "c.yaml", data_dir, tmp / "run", train={"max_steps": 4, "eval_every": 2, "keep_last": 2}
    )
    proc = run_in_process("train", str(cfg), cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"


@dataclass
class Ctx:
    tmp: Path
    data: Path
    trained: Path
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def run(self) -> Path:
        """A private copy of the trained run, to damage."""
        run = self.tmp / "run-copy"
        if not run.exists():
            shutil.copytree(self.trained, run, symlinks=True)
        return run

    def config(self, name: str = "c.yaml", out: str | None = "out", **sections: Any) -> str:
        return str(write_config(self.tmp / name, self.data, self.tmp / out if out else None, **sections))


@dataclass
class Case:
    id: str
    args: Callable[[Ctx], list[str]]
    code: int
    message: str  # a regex the output (stdout + stderr) must match
    stdin: str | None = None
    check: Callable[[Ctx, subprocess.CompletedProcess[str]], None] | None = None
    process: bool = False  # run as a subprocess: it needs a second process, a real stdin, or what the
    # process prints for warnings and logging (in this process pytest captures them)


# --------------------------------------------------------------------------- damage helpers


def each_manifest(run: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    for ckpt in (run / "checkpoints").glob("step-*"):
        path = ckpt / "manifest.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()))))


def rename_files(m: dict[str, Any]) -> dict[str, Any]:
    m["entries"] = m.pop("files")
    return m


def drop_bytes(m: dict[str, Any]) -> dict[str, Any]:
    del m["files"]["model.safetensors"]["bytes"]
    return m


def nan_weights(ctx: Ctx) -> list[str]:
    """NaN in every checkpoint's weights, with a manifest that matches them (so the hashes pass)."""
    for ckpt in (ctx.run / "checkpoints").glob("step-*"):
        weights = load_file(str(ckpt / "model.safetensors"))
        weights["head.weight"][0, 0] = float("nan")
        save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
        manifest = json.loads((ckpt / "manifest.json").read_text())
        manifest["files"]["model.safetensors"] = {
            "sha256": checkpoint._sha256(ckpt / "model.safetensors"),
            "bytes": (ckpt / "model.safetensors").stat().st_size,
        }
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return ["predict", str(ctx.run), "great film"]


def dangling_last(ctx: Ctx) -> list[str]:
    shutil.rmtree((ctx.run / "last").resolve())
    return ["predict", str(ctx.run), "great film", "--checkpoint", "last"]


def once(pattern: str) -> Callable[[Ctx, subprocess.CompletedProcess[str]], None]:
    def check(ctx: Ctx, proc: subprocess.CompletedProcess[str]) -> None:
        assert len(re.findall(pattern, proc.stderr)) == 1, proc.stderr

    return check


def stale_tmp(ctx: Ctx) -> list[str]:
    cfg = ctx.config(out=None, train={"max_steps": 5})
    run = ctx.run
    (run / "checkpoints" / ".tmp-step-00000009-999").mkdir()
    (run / "checkpoints" / ".tmp-step-00000009-999" / "model.safetensors").write_bytes(b"partial")
    return ["train", cfg, "--resume", f"output_dir={run}", "train.max_steps=5"]


def no_stale_tmp(ctx: Ctx, proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0 and not list((ctx.run / "checkpoints").glob(".tmp-*"))


# --------------------------------------------------------------------------- run directory


def locked(ctx: Ctx) -> list[str]:
    """Another process (this test) holds the run directory's lock, as a running `seqtrain train` does."""
    out = ctx.tmp / "out"
    out.mkdir()
    f = open(out / ".lock", "w")  # noqa: SIM115 - held until the case ends
    f.write(f"{os.getpid()}\n")
    f.flush()
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    ctx.notes["lock"] = f
    return ["train", ctx.config()]


def dead_lock(ctx: Ctx) -> list[str]:
    """A lock file left behind by a process that died: it blocks nothing."""
    out = ctx.tmp / "out"
    out.mkdir()
    (out / ".lock").write_text("999999\n")
    return ["train", ctx.config()]


def users_folder(ctx: Ctx) -> list[str]:
    (ctx.tmp / "config.yaml").write_text("# my precious comments\nname: mine\n")
    (ctx.tmp / "metrics.jsonl").write_text('{"mine": 1}\n')
    cfg = ctx.config("train.yaml")
    return ["train", cfg, "output_dir=."]


def users_files_untouched(ctx: Ctx, proc: subprocess.CompletedProcess[str]) -> None:
    assert (ctx.tmp / "config.yaml").read_text().startswith("# my precious comments")
    assert (ctx.tmp / "metrics.jsonl").read_text() == '{"mine": 1}\n'


# --------------------------------------------------------------------------- data files


def csv_files(ctx: Ctx, train: bytes, skip: bool = True, **data: Any) -> list[str]:
    (ctx.tmp / "train.csv").write_bytes(train)
    rows = synthetic_rows(20, 1)
    (ctx.tmp / "val.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    section = {
        "path": str(ctx.tmp / "train.csv"),
        "eval_path": str(ctx.tmp / "val.csv"),
        "on_bad_rows": "skip" if skip else "error",
        **data,
    }
    return ["train", ctx.config(data=section)]


def broken_eval_csv(ctx: Ctx) -> list[str]:
    args = csv_files(ctx, good_csv(), skip=False)
    with open(ctx.tmp / "val.csv", "a") as f:
        f.write("too,many,fields\n")
    return args


def good_csv(n: int = 60) -> bytes:
    return ("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in synthetic_rows(n, 0))).encode()


def empty_parquet(ctx: Ctx) -> list[str]:
    folder = ctx.tmp / "d"
    write_hub_folder(folder, {"validation": synthetic_rows(20, 1)})
    pq.write_table(
        pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}),
        folder / "train-00000-of-00001.parquet",
    )
    return ["train", ctx.config(data={"path": str(folder), "on_bad_rows": "skip"})]


def readme_only(ctx: Ctx) -> list[str]:
    folder = ctx.tmp / "readme"
    folder.mkdir()
    (folder / "README.txt").write_text("My dataset.\nComing soon.\n")
    return ["train", ctx.config(data={"path": str(folder)})]


def unknown_label(ctx: Ctx, skip: bool) -> list[str]:
    rows = synthetic_rows(60, 0, string_labels=True)
    rows[7]["label"] = "meh"
    folder = write_hub_folder(
        ctx.tmp / "d", {"train": rows, "validation": synthetic_rows(20, 1, string_labels=True)}
    )
    return [
        "train",
        ctx.config(
            data={
                "path": str(folder),
                "label_names": ["neg", "pos"],
                "on_bad_rows": "skip" if skip else "error",
            }
        ),
    ]


def skipped_one_unknown_label(ctx: Ctx, proc: subprocess.CompletedProcess[str]) -> None:
    assert json.loads((ctx.tmp / "out" / "run.json").read_text())["bad_rows"] == {"unknown label": 1}


# --------------------------------------------------------------------------- predict and eval


def text_file(ctx: Ctx, name: str, content: str) -> str:
    (ctx.tmp / name).write_text(content)
    return str(ctx.tmp / name)


def predicted(n: int) -> Callable[[Ctx, subprocess.CompletedProcess[str]], None]:
    def check(ctx: Ctx, proc: subprocess.CompletedProcess[str]) -> None:
        lines = proc.stdout.splitlines()
        assert len(lines) == n, proc.stdout
        for line in lines:
            json.loads(line)

    return check


def dataset_with_empty_row(ctx: Ctx) -> list[str]:
    rows = synthetic_rows(5, 3)
    rows[2]["text"] = "  "
    write_hub_folder(ctx.tmp / "d", {"test": rows})
    return ["predict", str(ctx.trained), "--data", str(ctx.tmp / "d"), "--split", "test"]


def eval_keeps_summary(*extra: str) -> Callable[[Ctx], list[str]]:
    def args(ctx: Ctx) -> list[str]:
        ctx.notes["summary"] = (ctx.run / "eval-validation.json").read_text()
        return ["eval", str(ctx.run), *extra]

    return args


def summary_untouched(ctx: Ctx, proc: subprocess.CompletedProcess[str]) -> None:
    assert (ctx.run / "eval-validation.json").read_text() == ctx.notes["summary"]
    assert len(list(ctx.run.glob("eval-validation-*.json"))) == 1


CASES = [
    # ---- checkpoints
    Case(
        "manifest-files-renamed",
        lambda c: (each_manifest(c.run, rename_files), ["eval", str(c.run)])[1],
        1,
        r"manifest\.json.*'files'",
    ),
    Case(
        "manifest-is-a-list",
        lambda c: (each_manifest(c.run, lambda m: list(m)), ["eval", str(c.run)])[1],
        1,
        r"manifest\.json.*(a list|JSON object)",
    ),
    Case(
        "manifest-entry-without-bytes",
        lambda c: (each_manifest(c.run, drop_bytes), ["eval", str(c.run)])[1],
        1,
        r"manifest\.json.*model\.safetensors.*'bytes'",
    ),
    Case(
        "nan-weights-refused",
        nan_weights,
        1,
        r"model\.safetensors.*(NaN|non-finite).*head\.weight",
        check=lambda c, p: pytest.fail(p.stdout) if "NaN" in p.stdout else None,
    ),
    Case(
        "dangling-last-warns-once",
        dangling_last,
        0,
        r"last.* points at .*step-00000004.*missing",
        check=once(r"points at"),
    ),
    Case("stale-tmp-cleaned-at-start", stale_tmp, 0, r"\.tmp-step-00000009-999", check=no_stale_tmp),
    # ---- run directory
    Case(
        "second-process-refused",
        locked,
        1,
        r"in use by another seqtrain process.*pid \d+",
        check=lambda c, p: c.notes["lock"].close(),
        process=True,
    ),
    Case("dead-process-lock-blocks-nothing", dead_lock, 0, r"run directory"),
    Case(
        "users-folder-refused",
        users_folder,
        2,
        r"output_dir.*config\.yaml.*metrics\.jsonl",
        check=users_files_untouched,
    ),
    Case(
        "name-escapes-runs",
        lambda c: ["train", c.config(out=None), "name=../../x"],
        2,
        r"\bname\b.*'\.\./\.\./x'",
    ),
    Case("name-empty", lambda c: ["train", c.config(out=None), 'name=""'], 2, r"\bname\b.*empty"),
    Case(
        "name-with-newline", lambda c: ["train", c.config(out=None), 'name="a\\nb"'], 2, r"\bname\b.*control"
    ),
    # ---- config
    Case("lr-nan", lambda c: ["train", c.config(), "train.lr=.nan"], 2, r"train\.lr.*finite"),
    Case("lr-inf", lambda c: ["train", c.config(), "train.lr=.inf"], 2, r"train\.lr.*finite"),
    Case(
        "hidden-size-absurd",
        lambda c: ["train", c.config(), "model.hidden_size=100000000000"],
        2,
        r"model\.hidden_size.*parameters",
    ),
    Case(
        "empty-config-file",
        lambda c: ["train", text_file(c, "empty.yaml", "# nothing yet\n")],
        2,
        r"empty\.yaml.*empty",
    ),
    Case(
        "label-names-empty", lambda c: ["train", c.config(), "data.label_names=[]"], 2, r"data\.label_names"
    ),
    Case(
        "warmup-longer-than-run",
        lambda c: ["train", c.config(), "train.warmup_steps=200"],
        0,
        r"train\.warmup_steps 200.*2 steps",
    ),
    # ---- predict and eval
    Case(
        "blank-lines-txt-one-to-one",
        lambda c: ["predict", str(c.trained), "-i", text_file(c, "in.txt", "good\n\n  \nbad\n")],
        0,
        r"lines? 2, 3.*blank",
        check=predicted(4),
    ),
    Case(
        "blank-lines-stdin-one-to-one",
        lambda c: ["predict", str(c.trained), "-i", "-"],
        0,
        r"lines? 2\b.*blank",
        stdin="good\n\nbad\n",
        check=predicted(3),
        process=True,
    ),
    Case(
        "ragged-csv-row-reported",
        lambda c: [
            "predict",
            str(c.trained),
            "-i",
            text_file(c, "in.csv", "text,id\ngood,1\nbad,2,extra\nfine,3\n"),
        ],
        0,
        r"line 3: 3 fields.*header has 2",
        check=predicted(2),
    ),
    Case("predict-data-empty-row-reported", dataset_with_empty_row, 0, r"row 3.*empty", check=predicted(4)),
    Case(
        "output-into-missing-folder",
        lambda c: ["predict", str(c.trained), "hi", "-o", str(c.tmp / "nope" / "o.jsonl")],
        1,
        r"nope/o\.jsonl",
    ),
    Case(
        "output-onto-a-folder",
        lambda c: ["predict", str(c.trained), "hi", "-o", str(c.tmp)],
        1,
        r"--output.*folder",
    ),
    Case(
        "batch-size-zero",
        lambda c: ["predict", str(c.trained), "hi", "--batch-size", "0"],
        2,
        r"--batch-size",
    ),
    Case(
        "input-is-a-folder",
        lambda c: ["predict", str(c.trained), "-i", str(c.tmp)],
        1,
        r"--input.*is a folder",
    ),
    Case(
        "eval-limit-keeps-summary",
        eval_keeps_summary("--limit", "5"),
        0,
        r"eval-validation-limit5\.json",
        check=summary_untouched,
    ),
    Case(
        "eval-last-keeps-summary",
        eval_keeps_summary("--checkpoint", "last"),
        0,
        r"eval-validation-last\.json",
        check=summary_untouched,
    ),
    Case(
        "eval-data-keeps-summary",
        lambda c: eval_keeps_summary("--data", str(c.data))(c),
        0,
        r"eval-validation-data-",
        check=summary_untouched,
    ),
    # ---- data, with on_bad_rows: skip
    Case(
        "csv-extra-field-skip",
        lambda c: csv_files(c, good_csv() + b"too,many,fields\n" + good_csv()[11:]),
        0,
        r"line 62",
        process=True,  # pandas names the line in a warning, which a process prints and pytest would catch
    ),
    Case(
        "csv-extra-field-error",
        lambda c: csv_files(c, good_csv() + b"too,many,fields\n", skip=False),
        1,
        r"train\.csv.*line 62",
        process=True,
    ),
    Case(
        "csv-eval-split-extra-field-error",
        broken_eval_csv,
        1,
        r"split 'validation' of .*val\.csv.*line 22",
        process=True,
    ),
    Case(
        "csv-not-utf8-skip",
        lambda c: csv_files(c, good_csv() + b"caf\xe9 \xff\xfe,1\n"),
        0,
        r"skipped.*text is not valid UTF-8': 1",
    ),
    Case("csv-zero-bytes", lambda c: csv_files(c, b""), 1, r"train\.csv.*empty"),
    # datasets logs the read error: a process's logging writes to its stderr, not to an earlier runner's
    Case("parquet-zero-rows", empty_parquet, 1, r"split 'train'.*(no usable rows|empty)", process=True),
    Case("folder-with-only-readme", readme_only, 1, r"readme.*no data files"),
    Case("unknown-label-has-row-number", lambda c: unknown_label(c, skip=False), 1, r"row 7.*'meh'"),
    Case(
        "unknown-label-skipped",
        lambda c: unknown_label(c, skip=True),
        0,
        r"unknown label",
        check=skipped_one_unknown_label,
    ),
]


def case_marks(case: Case) -> list[pytest.MarkDecorator]:
    """A subprocess case is marked so; an in-process case that runs more than the config check is slow."""
    if case.process:
        return [pytest.mark.subprocess]
    return [] if case.code == 2 else [pytest.mark.slow]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=case_marks(c)) for c in CASES])
def test_hostile_cli(case: Case, tmp_path: Path, data_dir: Path, trained: Path) -> None:
    ctx = Ctx(tmp_path, data_dir, trained)
    args = case.args(ctx)
    if case.process:
        proc = cli(*args, cwd=tmp_path, stdin=case.stdin)
    else:
        assert case.stdin is None
        proc = run_in_process(*args, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == case.code, output
    assert re.search(case.message, " ".join(output.split()), re.S), output
    if case.check:
        case.check(ctx, proc)


# --------------------------------------------------------------------------- faults no file can cause


def small_save(run: Path, step: int, best: bool = True) -> None:
    torch.manual_seed(step)
    model = torch.nn.Linear(3, 2)
    checkpoint.save(run, step, model, None, {"step": step, "epoch": 0}, best=best, keep_last=1)


def test_disk_full_while_safetensors_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors reports ENOSPC as its own SafetensorError, not OSError: still a clear message,
    no orphan folder."""
    from safetensors import SafetensorError

    small_save(tmp_path, 1)

    def full(*args: Any, **kwargs: Any) -> None:
        raise SafetensorError(
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
            'message: "No space left on device" })'
        )

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(
        CheckpointError, match=r"step 2 .*No space left on device.*previous checkpoint is untouched"
    ):
        small_save(tmp_path, 2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]
    assert checkpoint.find(tmp_path, "last") == ((tmp_path / "checkpoints" / "step-00000001").resolve(), [])


@pytest.mark.parametrize(
    ("error", "full"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        ("Error while serializing: I/O error: No space left on device (os error 28)", True),
        ("Error while serializing: I/O error: Permission denied (os error 13)", False),
        (OSError(errno.EACCES, "Permission denied"), False),
    ],
)
def test_a_full_disk_is_told_apart_from_other_write_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError | str, full: bool
) -> None:
    """tune stops the study on DiskFullError (every later trial would fail too) but records any other
    CheckpointError as the trial's failure: the two must not be confused."""
    from safetensors import SafetensorError

    from seqtrain.errors import DiskFullError

    def failing(*args: Any, **kwargs: Any) -> None:
        raise SafetensorError(error) if isinstance(error, str) else error

    monkeypatch.setattr(checkpoint, "save_file", failing)
    with pytest.raises(CheckpointError, match="previous checkpoint is untouched") as raised:
        small_save(tmp_path, 1)
    assert isinstance(raised.value, DiskFullError) == full


def test_disk_full_while_linking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_save(tmp_path, 1)

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "symlink", full)
    with pytest.raises(CheckpointError, match=r"No space left on device"):
        small_save(tmp_path, 2)
    ckpt, _ = checkpoint.find(tmp_path, "last")
    checkpoint.load(ckpt)


class Killed(BaseException):
    pass


@pytest.mark.parametrize("kill_at", range(1, 7))
def test_same_step_resave_survives_a_kill_at_any_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill_at: int
) -> None:
    """Saving step 10 again (eval, then the end of training) with a kill at the n-th rename: `last` and
    `best` always point at a whole checkpoint."""
    small_save(tmp_path, 10)
    real = os.replace
    calls = {"n": 0}

    def replace(a: Any, b: Any) -> None:
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise Killed
        real(a, b)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with contextlib.suppress(Killed):
        small_save(tmp_path, 10)
    monkeypatch.setattr(checkpoint.os, "replace", real)
    for link in ("last", "best"):
        assert (tmp_path / link).resolve().is_dir(), f"{link} dangles after a kill at rename {kill_at}"
        ckpt, warnings = checkpoint.find(tmp_path, link)
        assert not warnings
        checkpoint.load(ckpt)


# --------------------------------------------------------------------------- no sources, no fault hooks


@pytest.mark.subprocess
def test_config_help_and_errors_work_without_sources(tmp_path: Path) -> None:
    """A bytecode-only install (no .py files, as some installers and zipapps ship): config-help prints
    every help text as with the sources, and a config error still says what the key means."""
    import compileall

    pkg = tmp_path / "seqtrain"
    shutil.copytree(ROOT / "seqtrain", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    assert compileall.compile_dir(pkg, legacy=True, quiet=1)  # foo.pyc beside foo.py: importable without it
    for py in pkg.glob("*.py"):
        py.unlink()
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "COLUMNS": "200"}

    def sourceless(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "seqtrain", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        return proc

    with_sources = cli("config-help")
    without = sourceless("config-help")
    assert without.returncode == 0 and without.stdout == with_sources.stdout
    assert "model.cell (one of 'rnn', 'lstm', 'gru', default 'lstm'): Recurrent cell." in without.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: lots\n")
    proc = sourceless("train", str(bad))
    assert proc.returncode == 2 and "Hidden units per direction and layer" in proc.stderr, proc.stderr


def test_config_help_snapshot_matches_the_source() -> None:
    from seqtrain.config import HELP_SNAPSHOT, help_snapshot

    shipped = json.loads((ROOT / "seqtrain" / HELP_SNAPSHOT).read_text())
    assert shipped == help_snapshot(), (
        "seqtrain/config_help.json is stale: run `python -m seqtrain.config` to refresh it"
    )


def test_no_fault_injection_hook_in_product_code() -> None:
    """The SIGKILL-after-save hook lives in tests/fault_entry.py,
    not behind an environment variable in seqtrain."""
    for py in (ROOT / "seqtrain").glob("*.py"):
        assert "SEQTRAIN_KILL_AFTER_SAVE" not in py.read_text(), py


@pytest.mark.subprocess
def test_out_of_memory_while_building_the_model_is_a_message(tmp_path: Path, data_dir: Path) -> None:
    """Below the parameter cap, an allocation can still fail (a small machine): exit 1 with a message that
    names the settings to shrink, no traceback. The failure is injected by the test-only entry point."""
    cfg = write_config(tmp_path / "c.yaml", data_dir, tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fault_entry", "no-memory", "train", str(cfg)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert re.search(
        r"out of memory: .*not enough memory.*model\.hidden_size", " ".join(proc.stderr.split())
    ), proc.stderr
