"""The command line: each command parses, validates and calls one function.

torch, datasets and rich are imported inside the commands, so `--help` and config errors answer
at once.
"""

from __future__ import annotations

import functools
import json
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec

import typer

from seqtrain import __version__
from seqtrain.errors import SeqtrainError

P = ParamSpec("P")

app = typer.Typer(
    name="seqtrain",
    help="Train, evaluate and use recurrent sentiment classifiers (RNN, LSTM, GRU) from a YAML config.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _fail(msg: str, code: int) -> typer.Exit:
    from seqtrain import console

    console.error(msg)
    return typer.Exit(code)


def _errors(
    interrupted: str | None = None, out_of_memory: bool = False
) -> Callable[[Callable[P, None]], Callable[P, None]]:
    """A command's errors as one line and an exit code instead of a traceback: a SeqtrainError as its
    message and exit_code; Ctrl-C as `interrupted` and 130 (where given; 128 + the signal's number for a
    KeyboardInterrupt that carries one); a failed allocation as what to make smaller (`out_of_memory`)."""

    def decorate(command: Callable[P, None]) -> Callable[P, None]:
        @functools.wraps(command)
        def run(*args: P.args, **kwargs: P.kwargs) -> None:
            try:
                command(*args, **kwargs)
            except SeqtrainError as e:
                raise _fail(str(e), e.exit_code) from None
            except KeyboardInterrupt as e:  # Ctrl-C, or another stop signal raised as one (`tune`)
                if interrupted is None:
                    raise
                raise _fail(interrupted, 128 + getattr(e, "signum", signal.SIGINT)) from None
            except (MemoryError, RuntimeError) as e:  # torch reports a failed allocation as a RuntimeError
                if not out_of_memory:
                    raise
                raise _out_of_memory(e) from None

        return run

    return decorate


def _version(value: bool) -> None:
    if value:
        typer.echo(f"seqtrain {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def _train_epilog() -> str:
    from seqtrain.config import SECTIONS

    return (
        "Config sections: top level (name, output_dir, seed), "
        + ", ".join(SECTIONS)
        + ". Run `seqtrain config-help` for every key with its default and meaning."
    )


@app.command(epilog=_train_epilog())
@_errors(interrupted="interrupted.", out_of_memory=True)
def train(
    config: Annotated[Path, typer.Argument(help="YAML config file (see configs/).")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Dotted overrides, e.g. model.cell=gru train.lr=3e-4.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in output_dir from its last/ checkpoint.")
    ] = False,
) -> None:
    """Train a model as CONFIG says: progress on screen, checkpoints and metrics in the run directory."""
    from seqtrain.config import dump_yaml, load_config

    cfg = load_config(config, overrides or [])
    from seqtrain import console
    from seqtrain.train import train as run_training

    console.print_config(dump_yaml(cfg))
    run_training(cfg, resume=resume, config_path=shlex.join([str(config), *(overrides or [])]))


def _out_of_memory(e: BaseException) -> BaseException:
    """A failed allocation as a message that says which settings size the memory; any other error as it
    was."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    if not isinstance(e, MemoryError) and not any(
        s in text.lower() for s in ("out of memory", "alloc", "not enough memory")
    ):
        return e
    return _fail(
        f"out of memory: {text}. Make the model smaller "
        "(model.hidden_size, model.embedding_dim, model.num_layers, tokenizer.vocab_size) "
        "or the batches (train.batch_size, data.max_length).",
        1,
    )


@app.command(epilog=_train_epilog())
@_errors(interrupted="interrupted.")
def pretrain(
    config: Annotated[Path, typer.Argument(help="YAML config file (see configs/imdb-pretrain.yaml).")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Dotted overrides, e.g. train.max_steps=1000.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in output_dir from its last/ checkpoint.")
    ] = False,
) -> None:
    """Pretrain the config's encoder as a language model on unlabeled text (the `pretrain:` section).

    Fine-tune from it with `model.init_from: RUN_DIR`."""
    from seqtrain.config import dump_yaml, load_config

    cfg = load_config(config, overrides or [])
    from seqtrain import console
    from seqtrain.pretrain import pretrain as run_pretraining

    console.print_config(dump_yaml(cfg))
    run_pretraining(cfg, resume=resume, config_path=shlex.join([str(config), *(overrides or [])]))


@app.command("config-help")
def config_help() -> None:
    """List every config key with its type, default and meaning."""
    from seqtrain.config import help_text

    typer.echo(help_text())


@app.command("eval")
@_errors()
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `seqtrain train`.")],
    split: Annotated[
        str | None, typer.Option(help="Split to evaluate (default: the config's eval split).")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Evaluate on another dataset: Hub id, folder or data files.")
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="Which checkpoint: best or last.")] = "best",
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N rows.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object to stdout.")] = False,
    with_report: Annotated[
        bool,
        typer.Option(
            "--report",
            help="Add accuracy by text length, truncation and unknown-token rates, calibration error.",
        ),
    ] = False,
    plots: Annotated[
        bool,
        typer.Option(
            "--plots",
            help="Write confusion.png, pr.png (two classes) and calibration.png into the run directory.",
        ),
    ] = False,
) -> None:
    """Loss, accuracy, macro precision/recall/F1, per-class table and confusion matrix.

    Writes eval-<split>.json in the run directory."""
    from seqtrain import console
    from seqtrain.evaluate import evaluate_run

    if checkpoint not in ("best", "last"):
        raise _fail(f"--checkpoint must be 'best' or 'last', got {checkpoint!r}.", 2)
    if limit is not None and limit < 1:
        raise _fail(f"--limit must be at least 1, got {limit}.", 2)
    report, title = evaluate_run(run_dir, split, data, checkpoint, limit, with_report, plots)
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        console.print_eval(report, title)
        if "report" in report:
            console.print_report(report["report"])


@app.command()
@_errors()
def predict(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="Run directory written by `seqtrain train`, or an ONNX export folder "
            "(`seqtrain export --format onnx`: runs on onnxruntime, starts without torch)."
        ),
    ],
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to classify.")] = None,
    input: Annotated[
        str | None,
        typer.Option("--input", "-i", help="File of texts (.txt, .jsonl, .csv, .parquet), or - for stdin."),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="A dataset instead: Hub id, local folder or data files (with --split)."),
    ] = None,
    split: Annotated[str, typer.Option(help="Split of --data to predict.")] = "test",
    output: Annotated[str, typer.Option("--output", "-o", help="Where to write results; - is stdout.")] = "-",
    format: Annotated[
        str | None,
        typer.Option("--format", help="jsonl or csv (default: from --output's extension, else jsonl)."),
    ] = None,
    text_column: Annotated[
        str, typer.Option(help="Text field in .jsonl / .csv / .parquet / dataset input.")
    ] = "text",
    id_column: Annotated[
        str, typer.Option(help="Carried through to the output when the input has it.")
    ] = "id",
    checkpoint: Annotated[str, typer.Option(help="Which checkpoint: best or last.")] = "best",
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 256,
    strict: Annotated[
        bool, typer.Option("--strict", help="Stop at the first malformed input line instead of skipping it.")
    ] = False,
    top_k: Annotated[
        int | None,
        typer.Option("--top-k", help="Also list the k most likely labels with their probabilities."),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(help="Binary tasks: predict the second label when its probability is at least this."),
    ] = None,
) -> None:
    """Classify texts; one result per text, in input order.

    Each result is {"text", "label", "probs"} ({"text", "score"} for regression)."""
    from seqtrain.inference.io import check_output
    from seqtrain.inference.onnx import is_export_folder
    from seqtrain.predict import predict_command

    fmt = format or ("csv" if output.endswith(".csv") else "jsonl")
    if fmt not in ("jsonl", "csv"):
        raise _fail(f"--format must be jsonl or csv, got {fmt!r}.", 2)
    if sum(x is not None and x != [] for x in (texts, input, data)) != 1:
        raise _fail(
            "give texts as arguments, or --input FILE (- for stdin), or --data DATASET --split NAME: "
            "one of them.",
            2,
        )
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise _fail(f"--threshold must be in [0, 1], got {threshold}.", 2)
    if batch_size < 1 or (top_k is not None and top_k < 1):
        raise _fail(f"--batch-size and --top-k must be at least 1, got {batch_size} and {top_k}.", 2)
    check_output(output)
    if checkpoint != "best" and is_export_folder(run_dir):
        raise _fail(
            "--checkpoint picks a checkpoint of a run directory; an export folder holds one model.", 2
        )
    predict_command(
        run_dir,
        texts,
        input,
        data,
        split,
        output,
        fmt,
        text_column,
        id_column,
        checkpoint,
        batch_size,
        strict,
        top_k,
        threshold,
    )


@app.command()
@_errors()
def explain(
    target: Annotated[Path, typer.Argument(help="Run directory, or an ONNX export folder (occlusion only).")],
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to explain.")] = None,
    input: Annotated[
        str | None,
        typer.Option("--input", "-i", help="File of texts (.txt, .jsonl, .csv, .parquet), or - for stdin."),
    ] = None,
    label: Annotated[
        str | None, typer.Option(help="Explain this class's probability (default: the predicted class).")
    ] = None,
    method: Annotated[
        str, typer.Option(help="occlusion (each token made <unk>) or integrated-gradients (run directories).")
    ] = "occlusion",
    format: Annotated[
        str,
        typer.Option(
            "--format", help="terminal (coloured text), jsonl (tokens with offsets and scores) or html."
        ),
    ] = "terminal",
    output: Annotated[str, typer.Option("--output", "-o", help="Where to write; - is stdout.")] = "-",
    text_column: Annotated[str, typer.Option(help="Text field in .jsonl / .csv / .parquet input.")] = "text",
    checkpoint: Annotated[str, typer.Option(help="Which checkpoint: best or last.")] = "best",
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 256,
    steps: Annotated[
        int, typer.Option(help="Integrated gradients: points on the path from the baseline.")
    ] = 32,
    strict: Annotated[
        bool, typer.Option("--strict", help="Stop at the first malformed input line instead of skipping it.")
    ] = False,
) -> None:
    """Which tokens drove each prediction: a score per token, with its character offsets in the input."""
    from seqtrain.explain import FORMATS, METHODS, explain_command

    if method not in METHODS or format not in FORMATS:
        raise _fail(
            f"--method must be one of {', '.join(METHODS)} and --format one of {', '.join(FORMATS)}.", 2
        )
    if (texts is not None and texts != []) == (input is not None):
        raise _fail("give texts as arguments, or --input FILE (- for stdin): one of them.", 2)
    if batch_size < 1 or steps < 1:
        raise _fail("--batch-size and --steps must be at least 1.", 2)
    explain_command(
        target,
        texts or [],
        input,
        label,
        method,
        format,
        output,
        text_column=text_column,
        checkpoint=checkpoint,
        batch_size=batch_size,
        steps=steps,
        strict=strict,
    )


@app.command()
@_errors()
def plot(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="One or more run directories (each with metrics.jsonl).")
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="PNG to write (default: curves.png in the first run directory)."),
    ] = None,
) -> None:
    """Draw loss and accuracy per step, train and eval, of one or more runs on one figure."""
    from seqtrain import console
    from seqtrain.plots import plot_run_curves

    path = plot_run_curves(run_dirs, output or run_dirs[0] / "curves.png")
    console.info(f"wrote {path}")


@app.command()
@_errors()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `seqtrain train`.")],
    format: Annotated[str, typer.Option("--format", "-f", help="onnx or torchscript.")] = "torchscript",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Folder to write (default: RUN_DIR/export).")
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="Which checkpoint: best or last.")] = "best",
) -> None:
    """Export the model (inputs: padded token ids and lengths) for use without seqtrain.

    tokenizer.json, labels.json and export.json are written beside it."""
    from seqtrain import console
    from seqtrain.export import export_run

    if checkpoint not in ("best", "last"):
        raise _fail(f"--checkpoint must be 'best' or 'last', got {checkpoint!r}.", 2)
    if format not in ("onnx", "torchscript"):
        raise _fail(f"--format must be onnx or torchscript, got {format!r}.", 2)
    info = export_run(run_dir, format, output, checkpoint)
    for w in info["warnings"]:
        console.warn(w)
    diff = info["max_abs_diff"]
    check = (
        f"max abs difference from the eager model {diff:.2e}"
        if diff is not None
        else "not checked (onnxruntime is not installed)"
    )
    console.info(
        f"wrote {info['folder']}/{info['model']} ({format}, {info['checkpoint']}) "
        f"with tokenizer.json, labels.json, config.yaml and export.json; {check}"
    )


@app.command()
@_errors()
def serve(
    target: Annotated[
        Path, typer.Argument(help="Run directory (torch), or an ONNX export folder (onnxruntime, no torch).")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on; 0 picks a free one.")] = 8000,
    max_batch_size: Annotated[
        int, typer.Option(help="Texts in one forward pass, from one or several requests.")
    ] = 64,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            help="How long a worker that became free waits for more texts to fill its batch; it stops "
            "waiting once every connection it holds has a request waiting (0: take what waits)."
        ),
    ] = 1.0,
    max_queue: Annotated[
        int,
        typer.Option(
            help="Texts waiting for the model; a request that would exceed it gets 503 with Retry-After."
        ),
    ] = 1024,
    max_texts: Annotated[int, typer.Option(help="Texts in one request; more get 413.")] = 256,
    max_bytes: Annotated[int, typer.Option(help="Bytes in one request body; more get 413.")] = 1_000_000,
    checkpoint: Annotated[
        str, typer.Option(help="Which checkpoint of a run directory: best or last.")
    ] = "best",
    grace_s: Annotated[
        int, typer.Option(help="After SIGTERM, seconds the requests in flight get to finish.")
    ] = 30,
    threads: Annotated[
        int | None,
        typer.Option(
            help="Each worker's model threads [default: the physical cores less one, shared by the "
            "workers; at least 1]."
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Model processes sharing the listening socket [default: the physical cores]."),
    ] = None,
    read_timeout_s: Annotated[
        float,
        typer.Option(help="Seconds a client gets to send a request's headers, and again its body; then 408."),
    ] = 10.0,
    explain_max_texts: Annotated[int, typer.Option(help="Texts in one /explain request; more get 413.")] = 16,
    explain_max_tokens: Annotated[
        int, typer.Option(help="Tokens (as the model reads them) in one /explain request; more get 413.")
    ] = 2048,
    explain_queue: Annotated[
        int, typer.Option(help="/explain requests waiting or running in a worker; more get 503.")
    ] = 4,
    docs: Annotated[
        bool, typer.Option(help="Serve FastAPI's /docs page (it loads its scripts from a CDN).")
    ] = False,
) -> None:
    """Serve predictions over HTTP, with a page at / to try the model.

    Endpoints: POST /predict /explain, GET /health /ready /info /metrics."""
    try:
        from seqtrain.serve import ServeOptions
        from seqtrain.serve import serve as run_server
    except ImportError as e:
        raise _fail(
            f"`seqtrain serve` needs the serve extra ({e.name} is not installed): "
            "pip install 'seqtrain[serve]'",
            1,
        ) from None
    run_server(
        target,
        ServeOptions(
            host=host,
            port=port,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            max_texts=max_texts,
            max_bytes=max_bytes,
            checkpoint=checkpoint,
            grace_s=grace_s,
            threads=threads,
            workers=workers,
            read_timeout_s=read_timeout_s,
            explain_max_texts=explain_max_texts,
            explain_max_tokens=explain_max_tokens,
            explain_queue=explain_queue,
            docs=docs,
        ),
    )


@app.command()
@_errors()
def init(
    data: Annotated[
        str, typer.Argument(help="Hub id, local dataset folder, or data files (.parquet/.csv/.jsonl/.txt).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Config file to write.")] = Path(
        "config.yaml"
    ),
    text_column: Annotated[
        str | None, typer.Option(help="Text column (default: the string column with the longest texts).")
    ] = None,
    label_column: Annotated[
        str | None,
        typer.Option(
            help=(
                "Label column (default: a ClassLabel, a column named like label, "
                "or the one with fewest values)."
            )
        ),
    ] = None,
    sample: Annotated[int, typer.Option(help="Training rows to read.")] = 5000,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT if it exists.")] = False,
    init_from: Annotated[
        str | None,
        typer.Option(
            "--init-from",
            help=(
                "A `seqtrain pretrain` run directory: the config fine-tunes from its encoder, "
                "with its tokenizer and shapes."
            ),
        ),
    ] = None,
) -> None:
    """Inspect a dataset (splits, columns, labels, text lengths) and write a starter config for it.

    The config is commented: what was found and why each value was chosen."""
    from seqtrain import console
    from seqtrain.init_config import write_starter

    if sample < 1:
        raise _fail(f"--sample must be at least 1, got {sample}.", 2)
    summary = write_starter(data, output, text_column, label_column, sample, force, init_from)
    console.print_dataset_summary(summary, str(output))


@app.command()
@_errors(interrupted="interrupted; run the same command again to continue the study.")
def tune(
    config: Annotated[
        Path,
        typer.Argument(help="YAML config to start from; each trial changes the keys of the search space."),
    ],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Dotted overrides of CONFIG, e.g. train.epochs=2.")
    ] = None,
    trials: Annotated[
        int, typer.Option("--trials", "-n", help="Trials in the study, counting those of earlier runs.")
    ] = 20,
    timeout: Annotated[float | None, typer.Option(help="Start no trial after this many minutes.")] = None,
    space: Annotated[
        Path | None,
        typer.Option(
            help=(
                "Search space YAML: dotted keys -> distributions (default: runs/<study>/space.yaml shows it)."
            )
        ),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help=(
                "Optuna storage URL (default: sqlite in runs/<study>/study.db); "
                "postgresql:// or mysql:// for several machines."
            )
        ),
    ] = None,
    study: Annotated[
        str | None, typer.Option(help="Study name and folder runs/<study> (default: <name>-tune).")
    ] = None,
    jobs: Annotated[
        int, typer.Option(help="Trials at once on this machine, the cores divided between them.")
    ] = 1,
    pruner: Annotated[
        str,
        typer.Option(
            help="top15 (keep a trial while it is in the top 15% of the trials at its share of "
            "training), quartile (top 25%), median, hyperband or none."
        ),
    ] = "top15",
    seed: Annotated[
        int | None,
        typer.Option(help="Seed of the TPE sampler (default: random); reproducible with one process."),
    ] = None,
    keep_pruned: Annotated[
        bool,
        typer.Option(
            "--keep-pruned",
            help="Keep the checkpoints of pruned trials (default: deleted once pruned; their metrics and "
            "config stay).",
        ),
    ] = False,
    no_report: Annotated[bool, typer.Option("--no-report", hidden=True)] = False,
) -> None:
    """Search hyperparameters with Optuna; bad trials are pruned early.

    Each trial is a seqtrain run in runs/<study>/trial-NNNN; rerun the same command to continue a study."""
    from seqtrain.tune import Options
    from seqtrain.tune import tune as run_tune

    code = run_tune(
        Options(
            config=config,
            overrides=overrides or [],
            trials=trials,
            timeout_min=timeout,
            space=space,
            storage=storage,
            study=study,
            jobs=jobs,
            pruner=pruner,
            report=not no_report,
            seed=seed,
            keep_pruned=keep_pruned,
        )
    )
    raise typer.Exit(code)


def main() -> None:
    """The `seqtrain` command. A command that stops for a stop signal exits 128 + signum; from then on the
    process ignores stop signals, so that the same request arriving late (`tune --jobs` passes each one on
    to its workers, which also get it from the terminal) cannot interrupt the interpreter's cleanup."""
    from seqtrain.machine import STOP_SIGNALS, ignore_stop_signals

    try:
        app()
    except SystemExit as exit_:
        if exit_.code in {128 + signum for signum in STOP_SIGNALS}:
            ignore_stop_signals()
        raise


if __name__ == "__main__":
    main()
