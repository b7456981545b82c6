"""Few labels: IMDB validation accuracy against the number of labelled training reviews, and against
minutes of language-model pretraining. `python -m bench.learning_curve [--sizes 1000 2000] [--lines ...]`

Lines:
  scratch    configs/imdb-best.yaml's recipe from scratch on the first N training reviews
  pretrained configs/imdb-semi.yaml: the same classifier fine-tuned from a `seqtrain pretrain` run
  linear     NB-weighted uni+bigrams + logistic regression (bench.baselines' strongest), on the same N

Small N trains for more epochs, so that every run takes at least --min-steps steps (N = 500 at 8 epochs
would be 64 steps). `--pretrain-runs` adds the second figure: accuracy at one N against pretraining
minutes, one fine-tune per pretraining snapshot (a run directory whose best/ is that snapshot).

Each measured point is appended to bench/out/learning_curve.jsonl (nothing is recomputed or copied);
the table between the markers in BENCHMARKS.md and bench/out/learning_curve.png are drawn from that file.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.baselines import read_split
from bench.common import data_path, write_between_markers

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
RESULTS = OUT / "learning_curve.jsonl"


# Each recurrent line: its config and overrides. `vectors` and `vectors+wide` start the embeddings from
# `seqtrain pretrain configs/imdb-vectors.yaml` (runs/imdb-vectors; minutes, made first if missing).
VECTORS_RUN = "runs/imdb-vectors"
LINES: dict[str, tuple[str, list[str]]] = {
    "scratch": ("configs/imdb-best.yaml", []),
    "pretrained": ("configs/imdb-semi.yaml", []),
    "wide": ("configs/imdb-best.yaml", ["model.ngrams=2"]),
    "vectors": ("configs/imdb-best.yaml", [f"model.init_from={VECTORS_RUN}"]),
    "vectors+wide": ("configs/imdb-best.yaml", [f"model.init_from={VECTORS_RUN}", "model.ngrams=2"]),
}


def ensure_vectors_run(threads: int) -> None:
    if (ROOT / VECTORS_RUN / "best").exists():
        return
    from seqtrain.config import load_config
    from seqtrain.pretrain import pretrain

    pretrain(load_config(ROOT / "configs/imdb-vectors.yaml", [f"train.num_threads={threads}"]))


def nb_bigrams_accuracy(n: int) -> float:
    """NB-weighted binary 1-2 grams + logistic regression (Wang & Manning 2012) on the first n reviews."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    data = data_path()
    train, valid = read_split(data, "train").iloc[:n], read_split(data, "validation")
    vec = CountVectorizer(ngram_range=(1, 2), binary=True, min_df=1 if n < 5000 else 2)
    x_train, x_valid = vec.fit_transform(train.text), vec.transform(valid.text)
    y = train.label.to_numpy()
    p = 1 + x_train[y == 1].sum(0)
    q = 1 + x_train[y == 0].sum(0)
    r = np.asarray(np.log((p / p.sum()) / (q / q.sum()))).ravel()
    clf = LogisticRegression(C=1.0, max_iter=3000).fit(x_train.multiply(r).tocsr(), y)
    return float((clf.predict(x_valid.multiply(r).tocsr()) == valid.label.to_numpy()).mean())


def train_point(config: str, n: int, min_steps: int, threads: int, extra: list[str]) -> dict[str, Any]:
    from seqtrain.config import load_config
    from seqtrain.train import train

    cfg = load_config(ROOT / config)
    # The same epochs for every line at a given N (not each config's own), so the lines train equally long.
    epochs = max(8, math.ceil(min_steps * cfg.train.batch_size / n))
    name = f"curve-{Path(config).stem}-{n}-" + "-".join(e.replace("/", "_").replace("=", "_") for e in extra)
    # One evaluation, at the end: at N = 500 the epochs are many and each would evaluate 5,000 reviews.
    overrides = [
        f"data.max_train_examples={n}",
        f"train.epochs={epochs}",
        f"train.num_threads={threads}",
        "train.eval_every=1000000",
        f"output_dir=runs/curve/{name.rstrip('-')}",
        *extra,
    ]
    cfg = load_config(ROOT / config, overrides)
    started = time.perf_counter()
    report = train(cfg)
    return {
        "accuracy": report["accuracy"],
        "minutes": (time.perf_counter() - started) / 60,
        "epochs": epochs,
        "overrides": overrides,
    }


def record(point: dict[str, Any]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(point) + "\n")
    print(json.dumps(point), flush=True)


def label(point: dict[str, Any]) -> str:
    """A line's name with the overrides that set it apart (not the ones every curve run gets, nor those
    that define the line in LINES)."""
    line = point["line"]
    defining = set(LINES[line][1]) if line in LINES else set()
    own = [
        o
        for o in point.get("overrides", [])
        if o not in defining
        and not o.startswith(
            (
                "data.max_train_examples=",
                "train.epochs=",
                "train.num_threads=",
                "train.eval_every=",
                "output_dir=",
                "model.init_from=",
            )
        )
    ]
    return line + (f" ({', '.join(own)})" if own else "")


def render() -> None:
    """Table and PNG from every point measured so far (the newest per line and size)."""
    points: dict[tuple[str, int, str], dict[str, Any]] = {}
    for line in RESULTS.read_text().splitlines() if RESULTS.exists() else []:
        p = json.loads(line)
        points[(label(p), p["n"], p.get("pretrain", ""))] = p
    by_size = sorted({k[1] for k in points if not k[2]})
    named = {k[0] for k in points if not k[2]}
    lines = [line for line in LINES if line in named] + sorted(named - set(LINES) - {"linear"}) + ["linear"]
    table = ["| labelled reviews | " + " | ".join(lines) + " |", "|---:|" + "---:|" * len(lines)]
    for n in by_size:
        cells = []
        for line in lines:
            p = points.get((line, n, ""))
            if p is None:
                cells.append("not run")
                continue
            epochs = f"{p['epochs']} epochs, " if "epochs" in p else ""
            cells.append(f"{p['accuracy']:.2%} ({epochs}{p['minutes']:.1f} min)")
        table.append(f"| {n:,} | " + " | ".join(cells) + " |")
    pre = sorted((p for k, p in points.items() if k[2]), key=lambda p: p["pretrain_minutes"])
    if pre and ("scratch", pre[0]["n"], "") in points:  # no pretraining at all: the scratch run at that size
        pre.insert(
            0,
            {
                **points[("scratch", pre[0]["n"], "")],
                "pretrain": "none (scratch)",
                "pretrain_steps": 0,
                "pretrain_minutes": 0.0,
            },
        )
    if pre:
        table += [
            "",
            "| pretraining snapshot | pretraining steps | pretraining minutes (as run) | labelled | epochs "
            "| fine-tuned accuracy |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        table += [
            f"| {p['pretrain']} | {p['pretrain_steps']:,} | {p['pretrain_minutes']:.0f} | {p['n']:,} "
            f"| {p['epochs']} "
            f"| {p['accuracy']:.2%} |"
            for p in pre
        ]
    text = "\n".join(table)
    write_between_markers(
        ROOT / "BENCHMARKS.md",
        "## Few labels: learning from unlabeled text",
        "bench.learning_curve",
        text,
    )
    print(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if pre else 1, figsize=(11 if pre else 6, 4), squeeze=False)
    for line in lines:
        xs = [n for n in by_size if (line, n, "") in points]
        axes[0][0].plot(xs, [points[(line, n, "")]["accuracy"] * 100 for n in xs], marker="o", label=line)
    axes[0][0].set(xscale="log", xlabel="labelled training reviews", ylabel="IMDB validation accuracy (%)")
    axes[0][0].legend()
    if pre:
        axes[0][1].plot([p["pretrain_minutes"] for p in pre], [p["accuracy"] * 100 for p in pre], marker="o")
        axes[0][1].set(
            xlabel="pretraining minutes (as run)", ylabel=f"accuracy with {pre[0]['n']:,} labels (%)"
        )
    fig.tight_layout()
    fig.savefig(OUT / "learning_curve.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.learning_curve", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[500, 1000, 2000, 5000, 20000])
    p.add_argument("--lines", nargs="*", default=["linear", "scratch", "pretrained"])
    p.add_argument("--min-steps", type=int, default=300, help="train at least this many steps at small N")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--pretrain-runs",
        nargs="*",
        type=Path,
        default=[],
        help="pretraining snapshots (run directories) for the accuracy-vs-pretraining-minutes figure",
    )
    p.add_argument("--pretrain-size", type=int, default=1000, help="labelled reviews for that figure")
    p.add_argument(
        "--pretrained-overrides",
        nargs="*",
        default=[],
        help="KEY=VALUE overrides of configs/imdb-semi.yaml for the pretrained line, e.g. train.lr=0.005",
    )
    p.add_argument("--render-only", action="store_true")
    a = p.parse_args(argv)
    if not a.render_only:
        unknown = [line for line in a.lines if line != "linear" and line not in LINES]
        if unknown:
            p.error(f"unknown --lines {unknown}; choose from linear, {', '.join(LINES)}")
        if any(line.startswith("vectors") for line in a.lines):
            ensure_vectors_run(a.threads)
        for n in a.sizes:
            for line in a.lines:
                if line == "linear":
                    started = time.perf_counter()
                    acc = nb_bigrams_accuracy(n)
                    record(
                        {
                            "line": line,
                            "n": n,
                            "accuracy": acc,
                            "minutes": (time.perf_counter() - started) / 60,
                        }
                    )
                else:
                    config, extra = LINES[line]
                    extra = extra + (a.pretrained_overrides if line == "pretrained" else [])
                    record({"line": line, "n": n, **train_point(config, n, a.min_steps, a.threads, extra)})
        for run in a.pretrain_runs:
            state = json.loads((run / "best" / "state.json").read_text())
            minutes = json.loads((run / "pretrain-minutes.json").read_text())["minutes"]
            point = train_point(
                "configs/imdb-semi.yaml", a.pretrain_size, a.min_steps, a.threads, [f"model.init_from={run}"]
            )
            record(
                {
                    "line": "pretrained",
                    "n": a.pretrain_size,
                    "pretrain": run.name,
                    "pretrain_steps": state["step"],
                    "pretrain_minutes": minutes,
                    **point,
                }
            )
    render()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
