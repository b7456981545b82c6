"""Which tokens drove a prediction: a score per token, by one of two methods.

A text's prediction — one class's probability, by default the predicted class's, or for regression
the score in the target's units — is attributed to its tokens by:

occlusion
    Remove one token at a time and run the model again. A token's score is
    p(class | text) - p(class | text without that token): a measured change of the model's output,
    not an estimate. It needs only forward passes, so it runs on a run directory (torch) and on an
    ONNX export (onnxruntime) alike, and one pass gives the change of every class (which
    `eval --report` uses for its top words per class). Cost: n + 1 forwards of up to n tokens per
    text. Removing is the perturbation the deletion test makes, so the top-scored token is the one
    whose removal lowers the probability most (the best first deletion there is); replacing the
    token with <unk> instead (`mode="unk"`, the method before) keeps the text's length, and scored
    lower in the deletion test (BENCHMARKS.md).

integrated gradients (Sundararajan et al., 2017), on the embeddings, torch runs only
    The average gradient of the class probability along the straight line from a baseline to the
    text's embeddings, times (embedding - baseline), summed over the embedding dimension. The
    baseline is the same text with every token replaced by <unk> (the embedding the model learnt
    for unknown words; padding stays padding): a reference the model has seen inside texts, so the
    scores answer "how much does knowing this word matter", and by completeness the scores of a
    text sum to p(text) - p(the all-unknown text of the same length). `baseline="zero"` (the zero
    vector, which is also the padding embedding) is there for comparison; the model never sees it
    inside a text, and in the deletion test neither baseline was better on both SST-2 and IMDB. The
    integral is a midpoint Riemann sum over `steps` points (32 by default; fewer or more steps barely
    moved the deletion test).

    A short torch implementation, not captum: `Classifier.forward` already takes an additive
    `delta` on the embeddings, so the whole method is one batched forward and one autograd.grad
    per chunk of texts; writing it here keeps every text's own length in one padded batch (texts
    x steps rows), runs on the torch pinned by the project without another dependency, and its
    completeness is checked in tests/test_explain.py.

Long inputs are handled in length-bucketed chunks: texts are sorted by token count and the rows
they need (occlusion: n + 1 per text; integrated gradients: steps per text) are grouped so each
forward pads little and stays within a fixed budget of rows or tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from seqtrain.encoding import CHARS_PER_TOKEN, UNK_ID, clip, pad, read_length, truncate
from seqtrain.errors import SeqtrainError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from seqtrain.config import DataConfig
    from seqtrain.inference.io import Predictor, Record
    from seqtrain.inference.run import Run


METHODS = ("occlusion", "integrated-gradients")


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
    return truncate(list(range(n_tokens)), max_length, truncation)


def encode_with_offsets(tokenizer: Tokenizer, texts: list[str], data: DataConfig) -> list[Encoded]:
    """The ids `encoding.encode` gives, with each token's character offsets in the original text.

    HF tokenizers report offsets into the string it was given, through normalisation (NFKC,
    lower-casing, <br /> removal). Texts clipped before tokenizing keep their head, tail, or head
    and tail joined by one space: tail offsets are shifted back to where they are in the original.
    """
    clipped = [clip(t, data) for t in texts]
    # clipped characters after `tail_from` come from the original's tail
    # (tail: all of them; head+tail: those after the joining space)
    tail_from = {"tail": -1, "head+tail": read_length(data) * CHARS_PER_TOKEN // 2}.get(data.truncation)
    out: list[Encoded] = []
    for text, cut, e in zip(
        texts, clipped, tokenizer.encode_batch(clipped, add_special_tokens=False), strict=True
    ):
        keep = kept_positions(len(e.ids), read_length(data), data.truncation)
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
        from seqtrain.inference.run import Run

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
