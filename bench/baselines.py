"""Linear baselines on IMDB, and how much they add to a trained run:
`python -m bench.baselines [RUN_DIR ...]`.

Needs scikit-learn (`pip install 'seqtrain[baselines]'`). On ../shared/data/imdb (or data/imdb) it fits

  TF-IDF (1-2 grams, sublinear tf) + logistic regression   the usual linear baseline
  NBSVM-style: binary 1-2 grams scaled by naive Bayes log-count ratios + logistic regression
               (Wang & Manning, 2012), the strongest linear model we know for this task

and prints their validation accuracy. For each RUN_DIR (a binary IMDB run) it also prints the run's
own accuracy, and the accuracy of averaging its positive-class probability with each baseline's;
with several runs, also the accuracy of averaging the runs with each other.
That average is an ensemble of a recurrent and a linear model; it measures how different their
errors are, and is not a seqtrain model.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import data_path


def read_split(data: Path, split: str) -> pd.DataFrame:
    """All parquet shards of one split of a Hub-layout folder, in order."""
    return pd.concat([pd.read_parquet(f) for f in sorted(glob.glob(str(data / f"{split}-*.parquet")))])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="binary IMDB run directories to compare and combine")
    a = p.parse_args(argv)
    try:
        from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise SystemExit("bench.baselines needs scikit-learn: pip install 'seqtrain[baselines]'") from None

    data = data_path()
    train, valid = read_split(data, "train"), read_split(data, "validation")
    y_train, y = train.label.to_numpy(), valid.label.to_numpy()

    tfidf = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=500_000)
    x_train, x_valid = tfidf.fit_transform(train.text), tfidf.transform(valid.text)
    p_tfidf = LogisticRegression(C=10, max_iter=2000).fit(x_train, y_train).predict_proba(x_valid)[:, 1]

    counts = CountVectorizer(ngram_range=(1, 2), binary=True, token_pattern=r"[\w']+|[^\w\s]")
    x_train, x_valid = counts.fit_transform(train.text), counts.transform(valid.text)
    pos = np.asarray(x_train[y_train == 1].sum(0)).ravel() + 1.0  # add-one smoothed feature counts per class
    neg = np.asarray(x_train[y_train == 0].sum(0)).ravel() + 1.0
    ratio = np.log((pos / pos.sum()) / (neg / neg.sum()))  # (features,) naive Bayes log-count ratio
    nb = LogisticRegression(C=1, max_iter=3000).fit(x_train.multiply(ratio).tocsr(), y_train)
    p_nb = nb.predict_proba(x_valid.multiply(ratio).tocsr())[:, 1]

    baselines = {"TF-IDF + LR": p_tfidf, "NB-weighted 1-2 grams + LR": p_nb}
    for name, probs in baselines.items():
        print(f"{name:28s} {((probs > 0.5) == y).mean():.2%}")
    if a.runs:
        from seqtrain.inference.run import load_run, predict_probs

        runs_positive = []
        for run_dir in a.runs:
            run, _ = load_run(run_dir)
            positive = predict_probs(run, valid.text.tolist())[:, run.labels.names.index("positive")]
            runs_positive.append(positive)
            line = f"{run_dir}: {((positive > 0.5) == y).mean():.2%} alone"
            for name, probs in baselines.items():
                line += f"; averaged with {name}: {(((positive + probs) / 2 > 0.5) == y).mean():.2%}"
            print(line, flush=True)
        if len(runs_positive) > 1:
            mean = np.mean(runs_positive, axis=0)
            print(f"the {len(runs_positive)} runs averaged with each other: {((mean > 0.5) == y).mean():.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
