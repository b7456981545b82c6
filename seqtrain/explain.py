"""`seqtrain explain`: which tokens drove a prediction, and a way to check that they did.

A text's prediction — one class's probability, by default the predicted class's, or for regression
the score in the target's units — is attributed to its tokens by one of two methods:

occlusion
    Remove one token at a time and run the model again. A token's score is
    p(class | text) - p(class | text without that token): a measured change of the model's output,
    not an estimate. It needs only forward passes, so it runs on a run directory (torch) and on an
    ONNX export (onnxruntime) alike, and one pass gives the change of every class (which
    `eval --report` uses for its top words per class). Cost: n + 1 forwards of up to n tokens per
    text. Removing is the perturbation the deletion test makes, so the top-scored token is the one
    whose removal lowers the probability most (the best first deletion there is); replacing the
    token with <unk> instead (`mode="unk"`, the method before) kept the text's length and scored
    0.4460 against 0.4531 (SST-2) and 0.2484 against 0.2667 (IMDB) in AOPC@10 (BENCHMARKS.md).

integrated gradients (Sundararajan et al., 2017), on the embeddings, torch runs only
    The average gradient of the class probability along the straight line from a baseline to the
    text's embeddings, times (embedding - baseline), summed over the embedding dimension. The
    baseline is the same text with every token replaced by <unk> (the embedding the model learnt
    for unknown words; padding stays padding): a reference the model has seen inside texts, so the
    scores answer "how much does knowing this word matter", and by completeness the scores of a
    text sum to p(text) - p(the all-unknown text of the same length). `baseline="zero"` (the zero
    vector, which is also the padding embedding) is there for comparison; the model never sees it
    inside a text, and in the deletion test it was worse on SST-2 (AOPC@10 0.4283 against 0.4337)
    though better on IMDB (0.2265 against 0.2109). The integral is a midpoint Riemann sum over
    `steps` points (32; 8, 16 and 64 steps moved AOPC@10 by less than 0.003 on either).

    A short torch implementation, not captum: `Classifier.forward` already takes an additive
    `delta` on the embeddings, so the whole method is one batched forward and one autograd.grad
    per chunk of texts; writing it here keeps every text's own length in one padded batch (texts
    x steps rows), runs on the torch pinned by the project without another dependency, and its
    completeness is checked in tests/test_explain.py.

Long inputs are handled in length-bucketed chunks: texts are sorted by token count and the rows
they need (occlusion: n + 1 per text; integrated gradients: steps per text) are grouped so each
forward pads little and stays within a fixed budget of rows or tokens.

Faithfulness is measured with the deletion test (`deletion_drops`, AOPC): remove the k
highest-scored tokens and see how far the explained probability falls; `python -m bench.explain`
writes the figures into BENCHMARKS.md.
"""

from __future__ import annotations

import html
import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from seqtrain.encoding import CHARS_PER_TOKEN, UNK_ID, clip, pad
from seqtrain.errors import SeqtrainError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from seqtrain.config import DataConfig
    from seqtrain.inference import Run
    from seqtrain.predict import Predictor, Record

METHODS = ("occlusion", "integrated-gradients")
FORMATS = ("terminal", "jsonl", "html")
OCCLUSION_ROWS = 8192  # sequences per call into the model (each call is batched by length again)
IG_TOKENS = 1 << 17  # padded tokens per integrated-gradients forward (texts x steps x length)
OCCLUSION_MODE = "drop"  # occlusion removes each token ("drop") or replaces it with <unk> ("unk")


class ExplainError(SeqtrainError):
    exit_code = 2


# --------------------------------------------------------------------------- tokens with offsets


@dataclass
class Encoded:
    """A text as the model sees it: token ids, and for each real token its characters in the original text."""

    ids: list[int]
    spans: list[tuple[int, int]]  # [] when the text has no token (the model then reads a single <unk>)


def kept_positions(n_tokens: int, max_length: int, truncation: str) -> list[int]:
    """Which token positions `encoding.encode` keeps (head, tail or head+tail truncation)."""
    if n_tokens <= max_length:
        return list(range(n_tokens))
    if truncation == "head":
        return list(range(max_length))
    if truncation == "tail":
        return list(range(n_tokens - max_length, n_tokens))
    return list(range(max_length - max_length // 2)) + list(range(n_tokens - max_length // 2, n_tokens))


def encode_with_offsets(tokenizer: Tokenizer, texts: list[str], data: DataConfig) -> list[Encoded]:
    """The ids `encoding.encode` gives, with each token's character offsets in the original text.

    HF tokenizers report offsets into the string it was given, through normalisation (NFKC,
    lower-casing, <br /> removal). Texts clipped before tokenizing keep their head, tail, or head
    and tail joined by one space: tail offsets are shifted back to where they are in the original.
    """
    clipped = [clip(t, data) for t in texts]
    # clipped characters after `tail_from` come from the original's tail
    # (tail: all of them; head+tail: those after the joining space)
    tail_from = {"tail": -1, "head+tail": data.max_length * CHARS_PER_TOKEN // 2}.get(data.truncation)
    out: list[Encoded] = []
    for text, cut, e in zip(
        texts, clipped, tokenizer.encode_batch(clipped, add_special_tokens=False), strict=True
    ):
        keep = kept_positions(len(e.ids), data.max_length, data.truncation)
        shift = len(text) - len(cut)
        spans = []
        for i in keep:
            a, b = e.offsets[i]
            spans.append(
                (a + shift, b + shift) if shift and tail_from is not None and a > tail_from else (a, b)
            )
        out.append(Encoded([e.ids[i] for i in keep] or [UNK_ID], spans))
    return out


# --------------------------------------------------------------------------- occlusion


def occlusion(
    model: Predictor,
    encoded: list[Encoded],
    batch_size: int = 256,
    mode: str = OCCLUSION_MODE,
    max_rows: int = OCCLUSION_ROWS,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(probs (N, W), per text (n_i, W)): every output's change when token i is removed (mode "drop";
    a text of one token becomes the single <unk> of an empty text) or replaced by <unk> ("unk"):
    p(text) - p(text without token i). W is the number of classes, or 1 (the regression score).
    Texts go in length order, so each call holds rows of similar length."""
    W = 0
    probs: np.ndarray | None = None
    drops: list[np.ndarray] = [np.zeros((0, 0), np.float32)] * len(encoded)
    rows: list[list[int]] = []
    pending: list[int] = []

    def flush() -> None:
        nonlocal probs, W
        out = model.probs(rows, batch_size)
        if probs is None:
            W = out.shape[1]
            probs = np.zeros((len(encoded), W), np.float32)
        at = 0
        for i in pending:
            n = len(encoded[i].spans)
            probs[i] = out[at]
            drops[i] = out[at] - out[at + 1 : at + 1 + n]
            at += 1 + n
        rows.clear()
        pending.clear()

    for i in sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids)):
        ids = encoded[i].ids
        rows.append(ids)
        for j in range(len(encoded[i].spans)):
            rows.append(
                [*ids[:j], UNK_ID, *ids[j + 1 :]] if mode == "unk" else (ids[:j] + ids[j + 1 :]) or [UNK_ID]
            )
        pending.append(i)
        if len(rows) >= max_rows:
            flush()
    if rows:
        flush()
    return (probs if probs is not None else np.zeros((0, 0), np.float32)), drops


# --------------------------------------------------------------------------- integrated gradients


def integrated_gradients(
    run: Run,
    encoded: list[Encoded],
    targets: list[int],
    steps: int = 32,
    baseline: str = "unk",
    max_tokens: int = IG_TOKENS,
) -> tuple[list[np.ndarray], np.ndarray]:
    """(per text (n_i,) scores, ends (N, 2)): integrated gradients of output `targets[i]` (a class
    probability, or the regression score) with respect to the embeddings, and that output at the
    text and at the baseline. Completeness: scores[i].sum() ~= ends[i, 0] - ends[i, 1]."""
    import torch

    from seqtrain.losses import to_probs

    model = run.model
    was_training = model.training
    model.eval()
    scores: list[np.ndarray] = [np.zeros(0, np.float32)] * len(encoded)
    ends = np.zeros((len(encoded), 2), np.float64)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    alphas = (torch.arange(steps, dtype=torch.float32, device=run.device) + 0.5) / steps
    start = 0
    # cuDNN runs RNN backward only in training mode; the native kernels run it in eval mode (no dropout)
    with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * steps * len(encoded[order[end]].ids) <= max_tokens:
                end += 1
            idx = order[start:end]
            start = end
            ids_np, lengths_np = pad([encoded[i].ids for i in idx])
            ids, lengths = (
                torch.from_numpy(ids_np).to(run.device),
                torch.from_numpy(lengths_np).to(run.device),
            )
            B, T = ids.shape
            emb = model.embedding(ids).detach()  # (B, T, E)
            real = (torch.arange(T, device=run.device).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(
                -1
            )  # (B, T, 1)
            ref = (
                model.embedding.weight[UNK_ID].detach() if baseline == "unk" else torch.zeros_like(emb[0, 0])
            )
            diff = torch.where(real, emb - ref, torch.zeros_like(emb))  # (B, T, E); zero at padding
            target = torch.tensor([targets[i] for i in idx], device=run.device)
            delta = (
                ((alphas - 1).view(1, steps, 1, 1) * diff.unsqueeze(1))
                .reshape(B * steps, T, -1)
                .requires_grad_()
            )
            out = to_probs(
                model(ids.repeat_interleave(steps, 0), lengths.repeat_interleave(steps, 0), delta),
                run.labels,
                run.config,
            )
            picked = out.gather(1, target.repeat_interleave(steps).unsqueeze(1)).sum()
            (grad,) = torch.autograd.grad(picked, delta)
            attr = (grad.view(B, steps, T, -1).mean(1) * diff).sum(-1).detach().cpu().numpy()  # (B, T)
            with torch.no_grad():
                at_text = to_probs(model(ids, lengths), run.labels, run.config).gather(1, target.unsqueeze(1))
                at_base = to_probs(model(ids, lengths, -diff), run.labels, run.config).gather(
                    1, target.unsqueeze(1)
                )
            for row, i in enumerate(idx):
                scores[i] = attr[row, : len(encoded[i].spans)].astype(np.float32)
                ends[i] = float(at_text[row, 0]), float(at_base[row, 0])
    model.train(was_training)
    return scores, ends


# --------------------------------------------------------------------------- explanations


@dataclass
class Explanation:
    text: str
    id: Any
    probs: np.ndarray  # (W,): class probabilities, or (1,) the regression score
    target: int  # which output is explained
    encoded: Encoded
    scores: np.ndarray  # (len(encoded.spans),)


def explain_texts(
    model: Predictor,
    texts: list[str],
    method: str = "occlusion",
    label: int | None = None,
    batch_size: int = 256,
    steps: int = 32,
    ids: list[Any] | None = None,
    occlusion_mode: str = OCCLUSION_MODE,
) -> list[Explanation]:
    """Explain each text's predicted class (or output `label`), in input order."""
    encoded = encode_with_offsets(model.tokenizer, texts, model.config.data)
    if method == "occlusion":
        probs, drops = occlusion(model, encoded, batch_size, occlusion_mode)
        targets = [label if label is not None else int(p.argmax()) for p in probs]
        scores = [d[:, t] for d, t in zip(drops, targets, strict=True)]
    elif method == "integrated-gradients":
        from seqtrain.inference import Run

        if not isinstance(model, Run):
            raise ExplainError(
                "integrated gradients needs the model's gradients: give the run directory, "
                "or use --method occlusion."
            )
        probs = model.probs([e.ids for e in encoded], batch_size)
        targets = [label if label is not None else int(p.argmax()) for p in probs]
        scores = integrated_gradients(model, encoded, targets, steps)[0]
    else:
        raise ExplainError(f"--method must be one of {', '.join(METHODS)}, got {method!r}.")
    ids = ids or [None] * len(texts)
    return [Explanation(*row) for row in zip(texts, ids, probs, targets, encoded, scores, strict=True)]


def explain_stream(
    model: Predictor,
    records: Iterable[Record],
    method: str,
    label: int | None = None,
    chunk: int = 512,
    batch_size: int = 256,
    steps: int = 32,
) -> Iterator[Explanation]:
    """Explanations in input order, `chunk` texts at a time (sorted by length inside each chunk)."""
    buf: list[Record] = []
    for record in records:
        buf.append(record)
        if len(buf) >= chunk:
            yield from explain_texts(
                model, [t for t, _ in buf], method, label, batch_size, steps, [i for _, i in buf]
            )
            buf = []
    if buf:
        yield from explain_texts(
            model, [t for t, _ in buf], method, label, batch_size, steps, [i for _, i in buf]
        )


def to_record(ex: Explanation, model: Predictor, method: str) -> dict[str, Any]:
    """One JSONL object: the prediction, what is explained, and each token with its offsets and score."""
    from seqtrain.predict import to_record as prediction

    record: dict[str, Any] = {"id": ex.id} if ex.id is not None else {}
    record.update(prediction(model.labels, ex.text, ex.probs))  # what `predict` writes for this text
    record["explained"] = "score" if model.labels.task == "regression" else model.labels.names[ex.target]
    record["method"] = method
    record["tokens"] = [
        {"text": ex.text[a:b], "start": a, "end": b, "score": round(float(s), 6)}
        for (a, b), s in zip(ex.encoded.spans, ex.scores, strict=True)
    ]
    return record


# --------------------------------------------------------------------------- output


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


def load_target(target: Path, checkpoint: str) -> Predictor:
    """A run directory (torch) or an ONNX export folder (onnxruntime, no torch import)."""
    from seqtrain import console
    from seqtrain.exported import is_export_folder, load_exported_run

    if is_export_folder(target):
        return load_exported_run(target)
    from seqtrain.inference import load_run

    run, warnings = load_run(target, checkpoint, what="`seqtrain explain`")
    for w in warnings:
        console.warn(w)
    return run


def explain_command(
    target: Path,
    texts: list[str],
    input: str | None,
    label: str | None,
    method: str,
    fmt: str,
    output: str,
    *,
    text_column: str = "text",
    id_column: str = "id",
    checkpoint: str = "best",
    batch_size: int = 256,
    steps: int = 32,
    strict: bool = False,
) -> None:
    """`seqtrain explain`: read texts as `predict` does, explain each, write them in order; texts/s on
    stderr."""
    from seqtrain import console
    from seqtrain.predict import check_output, open_output, read_inputs, warn_malformed

    check_output(output)  # before loading anything
    model = load_target(target, checkpoint)
    index = None
    if label is not None:
        if model.labels.task == "regression":
            raise ExplainError("--label names a class; this run is a regression (its score is explained).")
        if label not in model.labels.names:
            raise ExplainError(
                f"--label {label!r} is not one of the run's labels: {', '.join(model.labels.names)}."
            )
        index = model.labels.names.index(label)
    from seqtrain.exported import ExportedRun

    if method == "integrated-gradients" and isinstance(model, ExportedRun):
        raise ExplainError(
            "integrated gradients needs the model's gradients: give the run directory, "
            "or use --method occlusion."
        )
    bad: list[str] = []
    blank: list[int] = []
    records = (
        read_inputs(input, text_column, id_column, bad, strict, blank)
        if input is not None
        else ((t, None) for t in texts)
    )
    started = time.perf_counter()
    sink = sys.stdout if output == "-" else open_output(output)
    try:
        chunk = 64 if input == "-" else 512  # stdin: answer sooner
        n, tokens = write_explanations(
            model, explain_stream(model, records, method, index, chunk, batch_size, steps), sink, fmt, method
        )
    finally:
        if sink is not sys.stdout:
            sink.close()
    seconds = time.perf_counter() - started
    warn_malformed(bad)
    if blank:
        console.warn(
            f"blank input line(s) {', '.join(map(str, blank[:20]))}{' ...' if len(blank) > 20 else ''}: "
            "explained as empty texts (no tokens), one output line per input line."
        )
    where = f" to {output}" if output != "-" else ""
    console.info(
        f"explained {n:,} texts ({tokens:,} tokens) with {method}{where} in {seconds:.2f} s: "
        f"{n / max(seconds, 1e-9):,.1f} texts/s"
    )


# --------------------------------------------------------------------------- faithfulness and summaries


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
    keeps the report to seconds: all of 2,000 SST-2 phrases, about 100 IMDB reviews of 200 tokens."""
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
