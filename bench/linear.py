"""The linear references seqtrain's accuracy claims are measured against:
`python -m bench.linear {imdb,sst2-sentences,sst2-small} [--json OUT]`.

Needs scikit-learn (`pip install 'seqtrain[baselines]'`, in `make install`). On one dataset's train and
validation splits it fits

  tfidf-lr      TF-IDF of 1-2 grams (sublinear tf) + logistic regression, C tuned on validation
  nblr-12       NB-weighted binary 1-2 grams + logistic regression (Wang & Manning 2012), C = 1
  nblr-tuned    the same with n-grams up to 2 or 3 and C, both tuned on validation

"Tuned on validation" picks the best of a small grid by its validation accuracy and reports that
accuracy: an optimistic figure for the linear model, which makes it the harder reference to beat.
Tokens are words and punctuation, lower-cased, as seqtrain's word tokenizer makes them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.baselines import read_split
from bench.common import ROOT, data_path, say

TOKEN_PATTERN = r"[\w']+|[^\w\s]"
C_GRID = (0.1, 0.3, 1.0, 3.0)


def load(dataset: str) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """(train texts, train labels, validation texts, validation labels) of a dataset bench knows."""
    if dataset == "imdb":
        train, valid = read_split(data_path("imdb"), "train"), read_split(data_path("imdb"), "validation")
        return list(train.text), train.label.to_numpy(), list(valid.text), valid.label.to_numpy()
    from bench.sst2_sentences import LABEL_NAMES, build

    hub, small = build(ROOT / "runs" / "data")
    if dataset == "sst2-sentences":
        train, valid = read_split(hub, "train"), read_split(hub, "validation")
        return list(train.sentence), train.label.to_numpy(), list(valid.sentence), valid.label.to_numpy()
    train, valid = pd.read_csv(small / "train.csv"), pd.read_csv(small / "validation.csv")
    to_int = {name: i for i, name in enumerate(LABEL_NAMES)}
    return (
        list(train.text),
        train.sentiment.map(to_int).to_numpy(),
        list(valid.text),
        valid.sentiment.map(to_int).to_numpy(),
    )


def nb_logistic_probs(
    train: list[str], y: np.ndarray, valid: list[str], ngram_max: int, c: float
) -> np.ndarray:
    """P(positive) on `valid` from binary 1..ngram_max grams scaled by naive Bayes log-count ratios."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    counts = CountVectorizer(ngram_range=(1, ngram_max), binary=True, token_pattern=TOKEN_PATTERN)
    x_train, x_valid = counts.fit_transform(train), counts.transform(valid)
    pos = np.asarray(x_train[y == 1].sum(0)).ravel() + 1.0  # add-one smoothed feature counts per class
    neg = np.asarray(x_train[y == 0].sum(0)).ravel() + 1.0
    ratio = np.log((pos / pos.sum()) / (neg / neg.sum()))  # (features,)
    model = LogisticRegression(C=c, max_iter=3000).fit(x_train.multiply(ratio).tocsr(), y)
    return np.asarray(model.predict_proba(x_valid.multiply(ratio).tocsr())[:, 1])


def tfidf_logistic_probs(train: list[str], y: np.ndarray, valid: list[str], c: float) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    tfidf = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, token_pattern=TOKEN_PATTERN)
    x_train, x_valid = tfidf.fit_transform(train), tfidf.transform(valid)
    return np.asarray(LogisticRegression(C=c, max_iter=3000).fit(x_train, y).predict_proba(x_valid)[:, 1])


def references(dataset: str) -> dict[str, Any]:
    """Each reference's validation accuracy (and, for the tuned ones, what the grid picked)."""
    train, y, valid, y_valid = load(dataset)
    started = time.perf_counter()

    def accuracy(p: np.ndarray) -> float:
        return float(((p > 0.5) == y_valid).mean())

    out: dict[str, Any] = {"dataset": dataset, "train": len(train), "validation": len(valid)}
    out["nblr-12"] = accuracy(nb_logistic_probs(train, y, valid, 2, 1.0))
    say(f"{dataset}: NB-LR 1-2 grams {out['nblr-12']:.4f}")
    grid = {(n, c): accuracy(nb_logistic_probs(train, y, valid, n, c)) for n in (2, 3) for c in C_GRID}
    (n, c), best = max(grid.items(), key=lambda item: item[1])
    out["nblr-tuned"], out["nblr-tuned-choice"] = best, {"ngram_max": n, "C": c}
    say(f"{dataset}: NB-LR tuned {best:.4f} (1-{n} grams, C={c})")
    tfidf = {c: accuracy(tfidf_logistic_probs(train, y, valid, c)) for c in (1.0, 3.0, 10.0, 30.0)}
    c = max(tfidf, key=tfidf.__getitem__)
    out["tfidf-lr"], out["tfidf-lr-choice"] = tfidf[c], {"C": c}
    say(f"{dataset}: TF-IDF LR {tfidf[c]:.4f} (C={c})")
    out["seconds"] = time.perf_counter() - started
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.linear", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=["imdb", "sst2-sentences", "sst2-small"])
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    a = p.parse_args(argv)
    result = references(a.dataset)
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
