"""How far ensembles get on the ratings' Spearman target:
`python -m bench.ratings --regression RUN... --binary RUN...`.

Needs scikit-learn (`pip install 'seqtrain[baselines]'`). On the IMDB validation split it prints the
Spearman correlation with the `rating` column of

  each regression run (expected stars), and the regression runs averaged
  those plus w x the binary runs' mean P(positive), and a v-weighted TF-IDF (1-2 grams) + ridge model
  the best of that grid: an upper bound for ensembles of these models, optimistic because the weights
    are picked on the validation split itself
  the oracle: the first regression run's stars moved c stars toward the true side (c x the true sign),
    which shows how much a more accurate polarity would be worth if it fixed exactly the right reviews

None of these ensembles is a seqtrain model; they measure how much ranking information is left on the
table by a single model, and what it would take to reach Spearman 0.85.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.baselines import read_split
from bench.common import data_path
from seqtrain.metrics import regression_report

SHIFTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 6.0)  # stars toward the true side, for the oracle


def spearman(pred: np.ndarray, target: np.ndarray) -> float:
    """The Spearman correlation seqtrain's own eval reports."""
    return float(regression_report(pred, target, True, float(target.min()), float(target.max()))["spearman"])


def ensemble_grid(
    regression: np.ndarray, positive: np.ndarray | None, ridge: np.ndarray | None, target: np.ndarray
) -> list[tuple[float, float, float]]:
    """(w, v, Spearman) of (1 - v) x (regression + w x positive) + v x (ridge + w x positive).

    regression (N,) stars; positive (N,) P(positive) or None; ridge (N,) stars or None.
    """
    ws = (0.0, 1.0, 2.0, 3.0, 4.0) if positive is not None else (0.0,)
    vs = (0.0, 0.1, 0.2, 0.3) if ridge is not None else (0.0,)
    pos = positive if positive is not None else np.zeros_like(regression)
    rid = ridge if ridge is not None else np.zeros_like(regression)
    return [
        (w, v, spearman((1 - v) * (regression + w * pos) + v * (rid + w * pos), target))
        for w in ws
        for v in vs
    ]


def oracle_shift(score: np.ndarray, target: np.ndarray, middle: float) -> list[tuple[float, float, float]]:
    """(c, polarity accuracy, Spearman) after moving every score c toward the side `target` is on."""
    side = np.where(target > middle, 1.0, -1.0)  # (N,)
    rows = []
    for c in SHIFTS:
        moved = score + c * side
        rows.append((c, float(((moved > middle) == (side > 0)).mean()), spearman(moved, target)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ratings", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--regression", nargs="+", type=Path, required=True, help="IMDB rating regression run directories"
    )
    p.add_argument(
        "--binary",
        nargs="*",
        type=Path,
        default=[],
        help="binary IMDB run directories (labels negative/positive)",
    )
    p.add_argument("--no-ridge", action="store_true", help="skip the TF-IDF + ridge model (about a minute)")
    a = p.parse_args(argv)
    from seqtrain.inference.run import load_run, predict_probs

    data = data_path()
    valid = read_split(data, "validation")
    texts, y = valid.text.tolist(), valid.rating.to_numpy().astype(np.float64)
    middle = (y[y < y.mean()].max() + y[y > y.mean()].min()) / 2  # 5.5 on IMDB: between 4 and 7 stars

    scores = []
    for run_dir in a.regression:
        run, _ = load_run(run_dir)
        scores.append(predict_probs(run, texts)[:, 0].astype(np.float64))
        print(
            f"{run_dir}: Spearman {spearman(scores[-1], y):.4f}, MAE {np.abs(scores[-1] - y).mean():.3f}",
            flush=True,
        )
    stars = np.mean(scores, axis=0)
    if len(scores) > 1:
        print(f"the {len(scores)} regression runs averaged: Spearman {spearman(stars, y):.4f}")

    positive = None
    if a.binary:
        probs = []
        for run_dir in a.binary:
            run, _ = load_run(run_dir)
            probs.append(predict_probs(run, texts)[:, run.labels.names.index("positive")].astype(np.float64))
        positive = np.mean(probs, axis=0)
        print(
            f"the {len(probs)} binary runs averaged: "
            f"polarity accuracy {((positive > 0.5) == (y > middle)).mean():.2%}"
        )

    ridge = None
    if not a.no_ridge:
        try:
            from sklearn.feature_extraction.text import TfidfVectorizer
            from sklearn.linear_model import Ridge
        except ImportError:
            raise SystemExit("bench.ratings needs scikit-learn: pip install 'seqtrain[baselines]'") from None
        train = read_split(data, "train")
        tfidf = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=500_000)
        ridge_model = Ridge(alpha=1.0).fit(
            tfidf.fit_transform(train.text), train.rating.to_numpy().astype(np.float64)
        )
        ridge = ridge_model.predict(tfidf.transform(valid.text))
        print(
            f"TF-IDF (1-2 grams) + ridge: Spearman {spearman(ridge, y):.4f}, "
            f"MAE {np.abs(ridge - y).mean():.3f}"
        )

    grid = ensemble_grid(stars, positive, ridge, y)
    for w, v, rho in grid:
        print(f"  regression + {w:.0f} x P(positive), {v:.0%} ridge: Spearman {rho:.4f}")
    w, v, rho = max(grid, key=lambda row: row[2])
    print(f"best ensemble (weights picked on validation): Spearman {rho:.4f} (w {w:.0f}, ridge {v:.0%})")
    print(f"oracle: {a.regression[0]}'s stars moved c toward the true side")
    for c, polarity, rho in oracle_shift(scores[0], y, middle):
        print(f"  c {c:4.2f}: polarity accuracy {polarity:.2%}, Spearman {rho:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
