"""`seqtrain eval --report`: where the model is right and wrong, beyond one accuracy number.

- accuracy (MAE for regression) by text length, in quantile buckets of token length;
- the truncation rate at `data.max_length` and the length distribution before truncation;
- the unknown-token rate (already measured by `inference.evaluation.evaluate`);
- calibration: the expected calibration error of the top label.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from seqtrain.config import DataConfig
from seqtrain.data import bad_row_reason, open_split
from seqtrain.encoding import CHARS_PER_TOKEN

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def length_buckets(
    lengths: np.ndarray,
    correct: np.ndarray,
    buckets: int = 4,
    max_length: int | None = None,
    regression: bool = False,
) -> list[dict[str, Any]]:
    """Rows split at quantiles of token length; per bucket: range, n, and accuracy (or mean abs error).

    `correct` is 1/0 per row for classification, the absolute error for regression. Lengths are
    counted after truncation, so every truncated text lands in the last bucket (flagged).
    """
    edges = np.unique(np.floor(np.quantile(lengths, np.linspace(0, 1, buckets + 1))).astype(np.int64))
    out: list[dict[str, Any]] = []
    lo = int(lengths.min())
    for hi in edges[1:] if len(edges) > 1 else edges:
        m = (lengths >= lo) & (lengths <= hi)
        if m.any():
            row: dict[str, Any] = {"min_tokens": lo, "max_tokens": int(hi), "n": int(m.sum())}
            row["mae" if regression else "accuracy"] = float(correct[m].mean())
            if max_length is not None and hi >= max_length:
                row["includes_truncated"] = True
            out.append(row)
        lo = int(hi) + 1
    return out


def truncation_stats(tokenizer: Tokenizer, data: DataConfig, split: str, limit: int | None) -> dict[str, Any]:
    """Re-tokenize the split without truncation: share of texts longer than max_length,
    and length percentiles.

    The evaluation batches only hold truncated ids, so this costs one more tokenizing pass (no model).
    Texts are clipped to max_length * CHARS_PER_TOKEN characters first, as training does: that
    never turns a truncated text into an untruncated one, and keeps huge rows cheap.
    """
    ds = open_split(data, split, limit).select_columns([data.text_column])
    budget = data.max_length * CHARS_PER_TOKEN
    lengths: list[int] = []
    for chunk in ds.iter(batch_size=1024):
        texts = [
            t[:budget] for t in chunk[data.text_column] if bad_row_reason(t, None, need_label=False) is None
        ]
        lengths.extend(len(e.ids) for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False))
    arr = np.asarray(lengths or [0])
    p50, p90, p99 = (int(v) for v in np.percentile(arr, [50, 90, 99]))
    return {
        "max_length": data.max_length,
        "truncated_rate": float((arr > data.max_length).mean()),
        "tokens_p50": p50,
        "tokens_p90": p90,
        "tokens_p99": p99,
        "tokens_max": int(arr.max()),
        "note": f"token lengths before truncation (capped at {budget:,} characters)",
    }


def build_report(
    arrays: dict[str, np.ndarray],
    eval_report: dict[str, Any],
    tokenizer: Tokenizer,
    data: DataConfig,
    split: str,
    limit: int | None,
    buckets: int = 4,
) -> dict[str, Any]:
    """The `report` entry of eval JSON, from `evaluate(..., collect=True)`'s arrays."""
    outputs, targets, lengths = arrays["outputs"], arrays["targets"], arrays["lengths"]
    regression = eval_report.get("task") == "regression"
    if regression:
        score = np.abs(outputs.reshape(-1) - targets.astype(np.float64))
    else:
        score = (outputs.argmax(1) == targets).astype(np.float64)
    report: dict[str, Any] = {
        "by_length": length_buckets(lengths, score, buckets, data.max_length, regression),
        "truncation": truncation_stats(tokenizer, data, split, limit),
        "unk_rate": eval_report["unk_rate"],
    }
    if not regression:
        from seqtrain.metrics import calibration

        report["ece"] = calibration(outputs, targets)["ece"]
    return report
