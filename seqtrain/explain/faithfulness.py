"""Are the scores faithful? The deletion test (AOPC) and a rank correlation between two scorings, for
`python -m bench.explain`; and the words that push each class most, for `eval --report`."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

from seqtrain.encoding import UNK_ID
from seqtrain.explain.attribution import Encoded, encode_with_offsets, occlusion

if TYPE_CHECKING:
    from seqtrain.config import DataConfig
    from seqtrain.inference.io import Predictor


def deletion_drops(
    model: Predictor,
    encoded: list[Encoded],
    scores: list[np.ndarray],
    targets: list[int],
    k_max: int = 10,
    batch_size: int = 256,
) -> np.ndarray:
    """(N, k_max): p_target(text) - p_target(text without its k highest-scored tokens), k = 1..k_max.

    The deletion test behind AOPC (Samek et al., 2017): its mean over k and texts is the area over
    the perturbation curve. Removing every token leaves the single <unk> an empty text becomes.
    """
    rows: list[list[int]] = []
    for e, s in zip(encoded, scores, strict=True):
        rows.append(e.ids)
        ranked = np.argsort(-np.asarray(s, dtype=np.float64), kind="stable")
        for k in range(1, k_max + 1):
            gone = set(ranked[:k].tolist())
            rows.append([t for j, t in enumerate(e.ids) if j not in gone] or [UNK_ID])
    out = model.probs(rows, batch_size).reshape(len(encoded), k_max + 1, -1)
    picked = out[np.arange(len(encoded)), :, np.asarray(targets, dtype=np.int64)]  # (N, k_max + 1)
    return picked[:, :1] - picked[:, 1:]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two score vectors (average ranks for ties); nan when either is constant."""
    from seqtrain.metrics import _ranks

    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def top_words(
    model: Predictor,
    data: DataConfig,
    split: str,
    limit: int | None = None,
    max_texts: int = 2000,
    max_cost: int = 4_000_000,
    k: int = 10,
    min_count: int = 5,
    batch_size: int = 256,
) -> dict[str, Any]:
    """`eval --report`: per class, the words with the largest mean occlusion score toward that class
    (words seen at least `min_count` times), over the first texts of the split: at most `max_texts`,
    and no more than `max_cost` tokens fed to the model (a text of n tokens costs n(n + 1)), which
    keeps the report to seconds: all the texts of a split of short phrases, fewer of long reviews."""
    from seqtrain.data import bad_row_reason, open_split

    texts: list[str] = []
    for row in open_split(data, split, limit).select_columns([data.text_column]):
        text = row[data.text_column]
        if bad_row_reason(text, None, need_label=False) is None:
            texts.append(text)
            if len(texts) >= max_texts:
                break
    started = time.perf_counter()
    encoded = encode_with_offsets(model.tokenizer, texts, data)
    costs = np.cumsum([len(e.ids) * (len(e.spans) + 1) for e in encoded])
    encoded = encoded[: max(1, int(np.searchsorted(costs, max_cost, side="right")))]
    _, drops = occlusion(model, encoded, batch_size)
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = defaultdict(int)
    for e, d in zip(encoded, drops, strict=True):
        for tok, row in zip(e.ids, d, strict=False):
            if tok != UNK_ID:
                sums[tok] = sums.get(tok, 0.0) + row
                counts[tok] += 1
    names = model.labels.names if model.labels.task == "classification" else ["score"]
    frequent = [t for t, c in counts.items() if c >= min_count]
    by_class: dict[str, list[dict[str, Any]]] = {}
    for c, name in enumerate(names):
        means = sorted(((float(sums[t][c]) / counts[t], t) for t in frequent), reverse=True)[:k]
        by_class[name] = [
            {"word": model.tokenizer.id_to_token(t), "mean": round(m, 6), "n": counts[t]} for m, t in means
        ]
    return {
        "texts": len(encoded),
        "min_count": min_count,
        "method": "occlusion",
        "by_class": by_class,
        "seconds": round(time.perf_counter() - started, 2),
    }
