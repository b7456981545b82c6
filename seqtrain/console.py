"""Everything the user sees in the terminal. The only module that imports rich.

Human output (progress, tables, messages) goes to stderr so that stdout stays clean for data:
`eval --json` and `predict` write machine-readable results there.
"""

from __future__ import annotations

from types import TracebackType
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.syntax import Syntax
from rich.table import Table

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def quiet() -> None:
    """Silence this process (the non-zero ranks of a distributed run)."""
    err.quiet = True
    out.quiet = True


def info(msg: str) -> None:
    err.print(escape(msg))


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {escape(msg)}")


def error(msg: str) -> None:
    err.print(f"[bold red]error:[/bold red] {escape(msg)}", soft_wrap=True)


def print_config(yaml_text: str) -> None:
    err.print(Syntax(yaml_text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))


class TrainProgress:
    """A live bar: step, epoch, loss, accuracy, real tokens/s and ETA."""

    def __init__(self, total_steps: int, start_step: int = 0, metric: str = "acc") -> None:
        self.progress = Progress(
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TextColumn(
                "ep {task.fields[epoch]} loss {task.fields[loss]:.3f} "
                + metric
                + " {task.fields[acc]:.3f} {task.fields[tps]:,.0f} tok/s"
            ),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(compact=True),
            console=err,
            transient=False,
        )
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=start_step, epoch=0, loss=0.0, acc=0.0, tps=0.0
        )

    def __enter__(self) -> TrainProgress:
        self.progress.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()

    def update(self, step: int, **fields: Any) -> None:
        self.progress.update(self.task, completed=step, **fields)

    def log(self, msg: str) -> None:
        self.progress.console.print(escape(msg))


def print_eval(report: dict[str, Any], title: str) -> None:
    """Summary, per-class table and confusion matrix (classification) or error measures (regression)."""
    if report.get("task") == "regression":
        table = Table(title=title)
        cols = ["n", "loss", "MAE", "RMSE", "R²", "Spearman"] + (
            ["rounded accuracy"] if "accuracy_rounded" in report else []
        )
        for col in cols:
            table.add_column(col, justify="right")
        row = [f"{report['n']:,}"] + [f"{report[k]:.4f}" for k in ("loss", "mae", "rmse", "r2", "spearman")]
        table.add_row(*row, *([f"{report['accuracy_rounded']:.4f}"] if "accuracy_rounded" in report else []))
        out.print(table)
        return
    summary = Table(title=title, show_header=True)
    for col in ("n", "loss", "accuracy", "precision (macro)", "recall (macro)", "F1 (macro)"):
        summary.add_column(col, justify="right")
    summary.add_row(
        f"{report['n']:,}",
        f"{report['loss']:.4f}",
        f"{report['accuracy']:.4f}",
        f"{report['precision_macro']:.4f}",
        f"{report['recall_macro']:.4f}",
        f"{report['f1_macro']:.4f}",
    )
    out.print(summary)
    per_class = Table(title="per class")
    for col in ("label", "precision", "recall", "F1", "support"):
        per_class.add_column(col, justify="right" if col != "label" else "left")
    for name, row in report["per_class"].items():
        per_class.add_row(
            escape(name),
            f"{row['precision']:.4f}",
            f"{row['recall']:.4f}",
            f"{row['f1']:.4f}",
            f"{row['support']:,}",
        )
    out.print(per_class)
    cm = Table(title="confusion matrix (rows: true, columns: predicted)")
    cm.add_column("")
    for name in report["labels"]:
        cm.add_column(escape(name), justify="right")
    for name, row in zip(report["labels"], report["confusion_matrix"], strict=True):
        cm.add_row(escape(name), *(f"{v:,}" for v in row))
    out.print(cm)
    extra = {
        k: v
        for k, v in report.items()
        if k in ("top_k_accuracy", "unk_rate", "truncated_rate", "examples_per_sec")
    }
    if extra:
        out.print("  ".join(f"{k}: {v:.4g}" for k, v in extra.items()))


def print_report(report: dict[str, Any]) -> None:
    """`eval --report`: accuracy (or MAE) by length bucket, then truncation,
    unknown tokens and calibration."""
    rows = report["by_length"]
    metric = "mae" if rows and "mae" in rows[0] else "accuracy"
    table = Table(title="by text length (tokens after truncation)")
    for col in ("tokens", "n", metric):
        table.add_column(col, justify="right")
    for row in rows:
        span = f"{row['min_tokens']}-{row['max_tokens']}" + (
            " (incl. truncated)" if row.get("includes_truncated") else ""
        )
        table.add_row(span, f"{row['n']:,}", f"{row[metric]:.4f}")
    out.print(table)
    tr = report["truncation"]
    out.print(
        f"truncated at max_length {tr['max_length']}: {tr['truncated_rate']:.2%} of texts; "
        f"tokens before truncation p50 {tr['tokens_p50']}, p90 {tr['tokens_p90']}, "
        f"p99 {tr['tokens_p99']}, max {tr['tokens_max']:,}"
    )
    line = f"unknown tokens: {report['unk_rate']:.2%} of tokens"
    if "ece" in report:
        line += f"; expected calibration error {report['ece']:.4f}"
    out.print(line)
    if "top_words" in report:
        print_top_words(report["top_words"])


def print_attributions(
    text: str, spans: list[tuple[int, int, float]], header: str, file: IO[str] | None = None
) -> None:
    """`seqtrain explain --format terminal`: a header line, then the text with each scored token on a
    background that is green (for the explained label) or red (against), the stronger the larger
    |score| relative to the text's largest. Written to stdout, or as plain text to `file`."""
    from rich.color import Color
    from rich.style import Style
    from rich.text import Text

    console = out if file is None else Console(file=file, highlight=False, width=100)
    body = Text(text)  # Text(), not markup: brackets in a review stay text
    top = max((abs(s) for _, _, s in spans), default=0.0) or 1.0
    for start, end, score in spans:
        w = min(1.0, abs(score) / top)
        if w < 0.1:
            continue
        far = (0, 160, 0) if score >= 0 else (215, 0, 0)
        rgb = [round(255 + (c - 255) * w) for c in far]  # from white towards green or red
        body.stylize(Style(color="black", bgcolor=Color.from_rgb(*rgb), bold=w > 0.6), start, end)
    console.print(escape(header), style="dim")
    console.print(body)
    console.print()


def print_top_words(top: dict[str, Any]) -> None:
    """`eval --report`: per class, the words whose occlusion moves the model most toward it."""
    table = Table(
        title=f"words with the largest mean {top['method']} score per class "
        f"(first {top['texts']:,} texts, words seen {top['min_count']}+ times)"
    )
    names = list(top["by_class"])
    for name in names:
        table.add_column(escape(name))
    depth = max((len(v) for v in top["by_class"].values()), default=0)
    for i in range(depth):
        cells = []
        for name in names:
            rows = top["by_class"][name]
            cells.append(
                escape(f"{rows[i]['word']} {rows[i]['mean']:+.3f} ({rows[i]['n']})") if i < len(rows) else ""
            )
        table.add_row(*cells)
    out.print(table)


def print_dataset_summary(summary: dict[str, Any], config_path: str) -> None:
    """`seqtrain init`: what was found in the dataset and where the starter config went."""
    table = Table(
        title=f"{summary['path']} (first {summary['rows_read']:,} rows of {summary['split']!r})",
        show_header=False,
    )
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("splits", escape(", ".join(summary["splits"])))
    table.add_row("columns", escape(", ".join(f"{c} ({t})" for c, t in summary["columns"].items())))
    table.add_row("text column", escape(summary["text_column"]))
    table.add_row("label column", escape(f"{summary['label_column']} ({summary['task']})"))
    if summary["task"] == "classification":
        counts = summary["label_counts"]
        shown = ", ".join(f"{k}: {v:,}" for k, v in list(counts.items())[:12]) + (
            " ..." if len(counts) > 12 else ""
        )
        table.add_row(f"labels ({len(counts)})", escape(shown))
    w, t = summary["words"], summary["tokens"]
    table.add_row("words per text", f"p50 {w['p50']}, p90 {w['p90']}, p99 {w['p99']}, max {w['max']:,}")
    table.add_row("tokens per text", f"p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']:,}")
    table.add_row(
        "distinct tokens",
        f"{summary['distinct_tokens']:,} ({summary['distinct_tokens_min2']:,} seen twice or more)",
    )
    out.print(table)
    for note in summary.get("notes", []):
        warn(note)
    err.print(
        f"wrote {escape(config_path)}: max_length {summary['max_length']}, "
        f"vocab_size {summary['vocab_size']:,}. Train with: seqtrain train {escape(config_path)}"
    )


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A plain table on stderr (`seqtrain tune`'s trials): the first two columns left-aligned,
    the rest right."""
    table = Table(title=escape(title))
    for i, col in enumerate(columns):
        table.add_column(escape(col), justify="left" if i in (0, 1) else "right", overflow="fold")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    if err.is_terminal or err.quiet:
        err.print(table)
    else:  # a log file: as wide as the table needs (else 80 columns, and each cell wraps)
        need = Measurement.get(err, err.options.update(width=1000), table).maximum
        Console(stderr=True, highlight=False, width=max(err.width, need)).print(table)
