"""PNG pictures of a run: training curves, confusion matrix, precision-recall and calibration.

matplotlib is imported inside each function (it is slow to import), so `seqtrain --help` stays fast.
We draw on `matplotlib.figure.Figure` objects and never touch `pyplot`: no global figure state,
no GUI backend is ever chosen, and `savefig` renders PNGs with the Agg canvas.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from seqtrain.metrics import calibration, precision_recall, read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100


def _figure(width: float, height: float, cols: int = 1) -> tuple[Figure, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless by construction; harmless if already chosen
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig, fig.subplots(1, cols)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------- training curves


def _metric_key(records: list[dict[str, Any]]) -> str:
    """The second panel's metric: accuracy for classification runs, MAE for regression runs."""
    return (
        "accuracy" if any("accuracy" in r for r in records) or not any("mae" in r for r in records) else "mae"
    )


def plot_curves(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: Path) -> Path:
    """Loss and accuracy (or MAE) against step: one colour per run, train solid, eval dashed with dots.

    `runs` is (label, metrics.jsonl records) per run; an eval line is every record whose split is
    not "train".
    """
    fig, (ax_loss, ax_metric) = _figure(11, 4.2, cols=2)
    metric = _metric_key([r for _, recs in runs for r in recs])
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for (label, records), color in zip(runs, colors, strict=True):
        train = [r for r in records if r.get("split") == "train"]
        evals = [r for r in records if r.get("split") != "train"]
        prefix = f"{label} " if len(runs) > 1 else ""
        eval_name = evals[0]["split"] if evals else "eval"
        for ax, key in ((ax_loss, "loss"), (ax_metric, metric)):
            tr = [(r["step"], r[key]) for r in train if key in r]
            ev = [(r["step"], r[key]) for r in evals if key in r]
            if tr:
                ax.plot(*zip(*tr, strict=True), color=color, linewidth=1.2, alpha=0.8, label=f"{prefix}train")
            if ev:
                ax.plot(
                    *zip(*ev, strict=True),
                    color=color,
                    linestyle="--",
                    marker="o",
                    markersize=4,
                    label=f"{prefix}{eval_name}",
                )
    for ax, title in ((ax_loss, "loss"), (ax_metric, metric)):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    return _save(fig, path)


def plot_run_curves(run_dirs: Sequence[Path], path: Path) -> Path:
    """curves.png for one or more run directories (their metrics.jsonl)."""
    runs = []
    for d in run_dirs:
        records = read_metrics(d / "metrics.jsonl")
        if not records:
            from seqtrain.errors import SeqtrainError

            raise SeqtrainError(
                f"{d / 'metrics.jsonl'} is missing or empty: is {d} a seqtrain run directory?"
            )
        runs.append((d.name or str(d), records))
    return plot_curves(runs, path)


def plot_pretrain_curves(run_dir: Path, path: Path) -> Path:
    """curves.png of a `seqtrain pretrain` run: training loss per step, and the held-out perplexity of
    each direction (exact, full softmax) at each evaluation."""
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("split") == "train"]
    heldout = [r for r in records if r.get("split") == "heldout"]
    fig, (left, right) = _figure(11, 4, cols=2)
    left.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (the training objective)")
    left.plot(
        [r["step"] for r in heldout], [r["loss"] for r in heldout], "o--", label="held-out NLL per token"
    )
    left.set(title="loss", xlabel="step")
    left.legend()
    for key, label in (
        ("perplexity", "mean of directions"),
        ("perplexity_forward", "forward"),
        ("perplexity_backward", "backward"),
    ):
        points = [r for r in heldout if key in r]
        if points:
            right.plot([r["step"] for r in points], [r[key] for r in points], "o-", label=label)
    right.set(title="held-out perplexity", xlabel="step", yscale="log")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------- evaluation pictures


def plot_confusion(cm: np.ndarray, names: Sequence[str], path: Path) -> Path:
    """Counts, shaded by the share of each true class (row), so small classes stay readable."""
    cm = np.asarray(cm)
    C = len(names)
    size = min(3.5 + 0.45 * C, 14)
    fig, ax = _figure(size + 1, size)
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="share of the true class")
    ax.set_xticks(
        range(C), labels=list(names), rotation=45 if C > 4 else 0, ha="right" if C > 4 else "center"
    )
    ax.set_yticks(range(C), labels=list(names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if C <= 30:  # beyond that the numbers are unreadable anyway
        for i in range(C):
            for j in range(C):
                ax.text(
                    j,
                    i,
                    f"{cm[i, j]:,}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    ax.set_title(f"confusion matrix (n={int(cm.sum()):,})")
    return _save(fig, path)


def plot_pr(probs: np.ndarray, targets: np.ndarray, names: Sequence[str], path: Path) -> Path:
    """Binary tasks: precision against recall for the second class (index 1) as the positive one."""
    scores, positive = probs[:, 1], targets == 1
    precision, recall, ap = precision_recall(scores, positive)
    fig, ax = _figure(5.5, 4.5)
    ax.step(
        np.r_[0.0, recall],
        np.r_[precision[0] if len(precision) else 1.0, precision],
        where="post",
        color="C0",
    )
    ax.axhline(positive.mean(), color="grey", linestyle=":", label=f"chance ({positive.mean():.2f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"recall ({names[1]})")
    ax.set_ylabel(f"precision ({names[1]})")
    ax.set_title(f"precision-recall, average precision {ap:.3f}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_calibration(probs: np.ndarray, targets: np.ndarray, path: Path, bins: int = 10) -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with the bin sizes."""
    cal = calibration(probs, targets, bins)
    low = 1.0 / probs.shape[1]  # the least confident a top label can be
    fig, ax = _figure(5.5, 4.5)
    width = 1.0 / bins
    mids = [(r["low"] + r["high"]) / 2 for r in cal["bins"]]
    ax.bar(
        mids, [r["accuracy"] for r in cal["bins"]], width=width * 0.9, color="C0", alpha=0.8, label="accuracy"
    )
    ax.plot(
        [r["confidence"] for r in cal["bins"]],
        [r["accuracy"] for r in cal["bins"]],
        "o",
        color="C1",
        markersize=4,
        label="mean confidence",
    )
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for m, r in zip(mids, cal["bins"], strict=True):
        ax.text(m, 0.02, f"{r['n']:,}", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xlim(max(0.0, low - width), 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence of the predicted label")
    ax.set_ylabel("accuracy")
    ax.set_title(f"calibration, ECE {cal['ece']:.3f}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def eval_plots(
    run_dir: Path,
    probs: np.ndarray,
    targets: np.ndarray,
    cm: np.ndarray,
    names: Sequence[str],
    suffix: str = "",
) -> list[Path]:
    """confusion.png, pr.png (two classes only) and calibration.png in `run_dir`; returns the paths."""
    paths = [plot_confusion(cm, names, run_dir / f"confusion{suffix}.png")]
    if len(names) == 2:
        paths.append(plot_pr(probs, targets, names, run_dir / f"pr{suffix}.png"))
    paths.append(plot_calibration(probs, targets, run_dir / f"calibration{suffix}.png"))
    return paths
