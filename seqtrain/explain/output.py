"""What `seqtrain explain` writes: one JSON record per text (the prediction and each token with its
offsets and score), an HTML page, or coloured text on the terminal."""

from __future__ import annotations

import html
import json
import sys
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

from seqtrain.explain.attribution import Explanation

if TYPE_CHECKING:
    from seqtrain.inference.io import Predictor


FORMATS = ("terminal", "jsonl", "html")


def to_record(ex: Explanation, model: Predictor, method: str) -> dict[str, Any]:
    """One JSONL object: the prediction, what is explained, and each token with its offsets and score."""
    from seqtrain.inference.io import to_record as prediction

    record: dict[str, Any] = {"id": ex.id} if ex.id is not None else {}
    record.update(prediction(model.labels, ex.text, ex.probs))  # what `predict` writes for this text
    record["explained"] = "score" if model.labels.task == "regression" else model.labels.names[ex.target]
    record["method"] = method
    record["tokens"] = [
        {"text": ex.text[a:b], "start": a, "end": b, "score": round(float(s), 6)}
        for (a, b), s in zip(ex.encoded.spans, ex.scores, strict=True)
    ]
    return record


HTML_HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>seqtrain explain</title>
<style>
body { font: 15px/1.6 system-ui, sans-serif; max-width: 60em; margin: 2em auto; color: #222; }
.ex { border-top: 1px solid #ddd; padding: .6em 0; }
.head { color: #555; font-size: 13px; }
.text { white-space: pre-wrap; }
.text span { border-radius: 3px; }
</style></head><body>
<h1>seqtrain explain</h1>
<p class="head">Each token's background: <span style="background: rgba(0,150,0,.6)">for</span> or
<span style="background: rgba(210,0,0,.6)">against</span> the explained label, stronger for larger scores
(relative to the text's largest); hover for the score.</p>
"""


def html_block(record: dict[str, Any]) -> str:
    """One text as HTML: every character of the input escaped, scored tokens on a coloured background."""
    text, tokens = record["text"], record["tokens"]
    top = max((abs(t["score"]) for t in tokens), default=0.0) or 1.0
    parts, at = [], 0
    for t in tokens:
        parts.append(html.escape(text[at : t["start"]]))
        alpha = min(1.0, abs(t["score"]) / top) * 0.75
        rgb = "0,150,0" if t["score"] >= 0 else "210,0,0"
        parts.append(
            f'<span style="background: rgba({rgb},{alpha:.2f})" title="{t["score"]:+.4f}">'
            f"{html.escape(text[t['start'] : t['end']])}</span>"
        )
        at = t["end"]
    parts.append(html.escape(text[at:]))
    head = html.escape(headline(record))
    return f'<div class="ex"><div class="head">{head}</div><div class="text">{"".join(parts)}</div></div>\n'


def headline(record: dict[str, Any]) -> str:
    method = record["method"]
    if "score" in record:
        return f"score {record['score']:.4g}; {method} scores of the score"
    label = record["label"]
    head = f"{label} ({record['probs'][label]:.3f})"
    if record["explained"] != label:
        head += f"; explaining {record['explained']} ({record['probs'][record['explained']]:.3f})"
    return f"{head}; {method}"


def write_explanations(
    model: Predictor, explanations: Iterable[Explanation], sink: IO[str], fmt: str, method: str
) -> tuple[int, int]:
    """Write as they come, in input order; returns (texts, tokens)."""
    from seqtrain import console

    texts = tokens = 0
    if fmt == "html":
        sink.write(HTML_HEAD)
    for ex in explanations:
        record = to_record(ex, model, method)
        if fmt == "jsonl":
            sink.write(json.dumps(record) + "\n")
        elif fmt == "html":
            sink.write(html_block(record))
        else:
            spans = [(t["start"], t["end"], t["score"]) for t in record["tokens"]]
            console.print_attributions(
                record["text"], spans, headline(record), None if sink is sys.stdout else sink
            )
        texts += 1
        tokens += len(record["tokens"])
        if texts % 64 == 0:
            sink.flush()
    if fmt == "html":
        sink.write("</body></html>\n")
    sink.flush()
    return texts, tokens
