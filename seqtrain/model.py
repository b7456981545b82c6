"""Embedding -> recurrent layers -> pooled real steps -> Linear.

Batches are right-padded and sorted by length, and go straight into PyTorch's fused
`nn.RNN` / `nn.LSTM` / `nn.GRU` kernels (a PackedSequence leaves the fused CPU kernel and runs
many times slower; BENCHMARKS.md). Padding never reaches the result:

- forward direction: padding comes after the real steps, so the state at step `length - 1` has
  read exactly the text; we gather it.
- backward direction: each row is reversed *within its own length* (padding stays on the right),
  run left to right, and reversed back. Its state at position 0 has read the whole text backwards.
- mean / max / attention pooling mask the padded positions.

So a text's logits do not depend on the other texts in its batch, and every call starts from a
zero hidden state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from seqtrain.config import DataConfig, ModelConfig
from seqtrain.encoding import PAD_ID, UNK_ID

CELLS: dict[str, Callable[..., nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def reverse_within_length(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """Index (B, T) that reverses each row's first `length` steps and leaves the padding in place."""
    t = torch.arange(T, device=lengths.device).unsqueeze(0)  # (1, T)
    last = (lengths - 1).unsqueeze(1)  # (B, 1)
    return torch.where(t <= last, last - t, t)  # (B, T); an involution: applying it twice is the identity


def recurrent_view(
    ids: torch.Tensor, lengths: torch.Tensor, max_length: int, truncation: str, delta: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """data.ngram_max_length: ids (B, T) as the n-gram path reads them -> (B, min(T, max_length)) ids and
    (B,) lengths of the tokens the recurrent path reads, cut as `encoding.truncate` cuts at max_length
    (head, tail or head+tail), and delta (B, T, E) cut the same way. Plain tensor ops on the shapes, so the
    ONNX export keeps dynamic batch and time sizes."""
    steps = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)  # (1, T)
    over = (lengths - max_length).clamp(min=0).unsqueeze(1)  # (B, 1) tokens beyond max_length
    if truncation == "head":
        source = steps.expand_as(ids)
    elif truncation == "tail":
        source = steps + over
    else:  # head+tail: the first max_length - max_length // 2 tokens, then the last max_length // 2
        source = torch.where(steps < max_length - max_length // 2, steps, steps + over)
    cut_lengths = lengths.clamp(max=max_length)
    padding = steps >= cut_lengths.unsqueeze(1)  # (B, T)
    # every real position's source lies within its text; padding reads position 0 and is blanked
    source = source.masked_fill(padding, 0)[:, :max_length]  # (B, T') with T' = min(T, max_length)
    cut = ids.gather(1, source).masked_fill(padding[:, :max_length], PAD_ID)
    if delta is not None:
        delta = delta.gather(1, source.unsqueeze(-1).expand(-1, -1, delta.shape[-1]))  # (B, T', E)
        delta = delta.masked_fill(padding[:, :max_length].unsqueeze(-1), 0.0)
    return cut, cut_lengths, delta


class Classifier(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        num_classes: int,
        init: bool = True,
        data: DataConfig | None = None,
    ) -> None:
        """num_classes: width of the output (1 for regression); init=False when weights will be loaded;
        data: how texts were cut, for data.ngram_max_length (the recurrent path's view is cut here)."""
        super().__init__()
        self.cfg = cfg
        # data.ngram_max_length: the ids hold up to that many tokens; the recurrent path reads
        # data.max_length of them, as data.truncation says
        self.view = (
            (data.max_length, data.truncation)
            if data is not None and data.ngram_max_length and num_classes
            else None
        )
        H = cfg.hidden_size
        self.directions = 2 if cfg.bidirectional else 1
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_dim, padding_idx=PAD_ID)
        self.embedding_dropout = nn.Dropout(cfg.embedding_dropout)
        cell = CELLS[cfg.cell]
        # One single-layer, single-direction fused kernel per (layer, direction): the backward
        # direction needs its own within-length reversal, which nn.LSTM(bidirectional=True) cannot do.
        self.layers = nn.ModuleList(
            nn.ModuleList(
                cell(cfg.embedding_dim if i == 0 else H * self.directions, H, batch_first=True)
                for _ in range(self.directions)
            )
            for i in range(cfg.num_layers)
        )
        self.dropout = nn.Dropout(cfg.dropout)
        out = H * self.directions
        # num_classes=0: the encoder alone, for the language model (pretrain.py) that has its own outputs.
        self.attention = nn.Linear(out, 1) if cfg.pooling == "attention" and num_classes else None
        self.head = nn.Linear(out, num_classes) if num_classes else None
        self.norm = nn.BatchNorm1d(out) if cfg.head_norm and num_classes else None
        # model.ngrams: one weight per output for each unigram (by id) and each hashed longer n-gram;
        # zero at the start, so the wide path begins by adding nothing.
        self.ngram_weights = (
            nn.Embedding(vocab_size + cfg.ngram_buckets, num_classes, padding_idx=PAD_ID)
            if cfg.ngrams and num_classes
            else None
        )
        # model.ngram_weighting nb: each feature's naive Bayes log-count ratio per output (V + buckets, C),
        # counted once on the training split (train.setup) and saved with the weights.
        scale = (
            torch.ones(vocab_size + cfg.ngram_buckets, num_classes) if cfg.ngram_weighting == "nb" else None
        )
        self.register_buffer("ngram_scale", scale if self.ngram_weights is not None else None)
        self.ngram_scale: torch.Tensor | None
        self.wide_output: torch.Tensor | None = None  # model.ngrams in training: (B, C), see forward
        if init:  # skipped when loading a checkpoint: the QR behind orthogonal init is wasted work there
            self._init_weights()

    def _init_weights(self) -> None:
        if self.ngram_weights is not None:
            nn.init.zeros_(self.ngram_weights.weight)
        for rnn in self.modules():
            if isinstance(rnn, nn.RNNBase):
                for name, p in rnn.named_parameters():
                    if name.startswith("weight_hh"):
                        # Orthogonal recurrence keeps gradients from vanishing or exploding early on.
                        for gate in p.data.chunk(p.shape[0] // p.shape[1]):
                            nn.init.orthogonal_(gate)
                    elif name.startswith("bias"):
                        nn.init.zeros_(p)
                        if isinstance(rnn, nn.LSTM) and name.startswith("bias_ih"):
                            H = p.shape[0] // 4
                            p.data[H : 2 * H] = 1.0  # forget gate open at the start

    def forward(
        self, ids: torch.Tensor, lengths: torch.Tensor, delta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ids (B, T) right-padded token ids, lengths (B,) >= 1 -> logits (B, C).

        delta (B, T, E), training only: added to the (dropped-out) embeddings; adversarial training
        passes zeros to get the loss's gradient with respect to them, then the perturbation."""
        assert self.head is not None, "an encoder built with num_classes=0 has no head"
        wide_ids, wide_lengths = ids, lengths
        if self.view is not None:  # data.ngram_max_length: the n-gram path reads further
            ids, lengths, delta = recurrent_view(ids, lengths, *self.view, delta)
        x = self.encode(ids, lengths, delta)  # (B, T, directions * H)
        pooled = self.pool(x, lengths)  # (B, directions * H)
        if self.norm is not None:  # model.head_norm
            norm = self.norm
            pooled = F.batch_norm(
                pooled,
                norm.running_mean,
                norm.running_var,
                norm.weight,
                norm.bias,
                # batch statistics in training, except for a batch of one text, which has no spread
                training=self.training and pooled.shape[0] > 1,
                momentum=norm.momentum or 0.0,
                eps=norm.eps,
            )
        out = self.activate(self.head(self.dropout(pooled)))  # (B, classes) or (B, 1)
        if self.ngram_weights is None:
            return out
        # model.ngrams: the wide path. In training the recurrent path's output is returned and the wide
        # path's is kept in `wide_output`, for its own loss (train.train_step): trained on their sum, the
        # n-gram weights memorise the training texts within an epoch and the recurrent path stops
        # learning. Each trained alone, their average is an ensemble of two models with different errors.
        wide = self.activate(
            ngram_logits(self.ngram_weights, wide_ids, wide_lengths, self.cfg, self.ngram_scale)
        )
        if self.training:
            self.wide_output = wide
            return out
        return (out + wide) / 2

    def activate(self, out: torch.Tensor) -> torch.Tensor:
        """A bounded regression's sigmoid (a score in [0, 1]); logits and unbounded scores as they are."""
        return torch.sigmoid(out) if self.cfg.task == "regression" and self.cfg.bounded else out

    def encode(
        self, ids: torch.Tensor, lengths: torch.Tensor, delta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ids (B, T), lengths (B,) -> every step's state (B, T, directions * H): the forward direction's
        at step t has read tokens 0..t, the backward direction's has read tokens t..length-1."""
        T = ids.shape[1]
        if self.training and self.cfg.word_dropout:
            real = torch.arange(T, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
            ids = ids.masked_fill(
                (torch.rand(ids.shape, device=ids.device) < self.cfg.word_dropout) & real, UNK_ID
            )
        x = self.embedding_dropout(self.embedding(ids))  # (B, T, E)
        if delta is not None:
            x = x + delta
        rev = reverse_within_length(lengths, T) if self.directions == 2 else None
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = self.dropout(x)
            fwd = self.run_layer(layer[0], x)  # type: ignore[index]  # (B, T, H)
            if rev is None:
                x = fwd
                continue
            idx = rev.unsqueeze(-1)  # (B, T, 1)
            bwd = self.run_layer(layer[1], x.gather(1, idx.expand(-1, -1, x.shape[-1])))  # type: ignore[index]
            bwd = bwd.gather(1, idx.expand(-1, -1, bwd.shape[-1]))  # back to reading order
            x = torch.cat([fwd, bwd], dim=-1)  # (B, T, 2H)
        return x

    def run_layer(self, rnn: nn.RNNBase, x: torch.Tensor) -> torch.Tensor:
        """One fused single-layer kernel: (B, T, in) -> (B, T, H). With weight_drop, in training, the
        hidden-to-hidden weights are passed through dropout for this call (the kernel stays fused)."""
        if self.training and self.cfg.weight_drop:
            params: dict[str, torch.Tensor] = dict(rnn.named_parameters())
            params["weight_hh_l0"] = F.dropout(params["weight_hh_l0"], self.cfg.weight_drop)
            return functional_call(rnn, params, (x,))[0]
        return rnn(x)[0]

    def pool(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, D), reading only the real steps."""
        B, T, _ = x.shape
        if self.cfg.pooling == "last":
            rows = torch.arange(B, device=x.device)
            H = self.cfg.hidden_size
            last = x[rows, lengths - 1, :H]  # forward state after the last real token
            if self.directions == 1:
                return last
            return torch.cat([last, x[:, 0, H:]], dim=-1)  # backward state after reading back to token 0
        mask = (torch.arange(T, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(
            -1
        )  # (B, T, 1)
        if self.cfg.pooling == "mean":
            return (x * mask).sum(1) / lengths.unsqueeze(1).to(x.dtype)
        if self.cfg.pooling == "max":
            return x.masked_fill(~mask, float("-inf")).amax(1)
        assert self.attention is not None
        scores = self.attention(x).masked_fill(~mask, float("-inf"))  # (B, T, 1)
        return (torch.softmax(scores, dim=1) * x).sum(1)


# Odd multipliers for hashing n-grams of token ids; ids stay below 2^24, so products fit in int64.
NGRAM_PRIMES = (1_000_003, 998_244_353)


def ngram_ids(
    ids: torch.Tensor, lengths: torch.Tensor, n: int, vocab_size: int, buckets: int
) -> torch.Tensor:
    """ids (B, T), lengths (B,) -> (B, F) feature ids of every 1..n-gram of each text, each feature once,
    PAD_ID for padding and repeats. Unigrams keep their token id; longer n-grams are hashed into
    [vocab_size, vocab_size + buckets)."""
    T = ids.shape[1]
    steps = torch.arange(T, device=ids.device).unsqueeze(0)  # (1, T)
    features = [torch.where(steps < lengths.unsqueeze(1), ids, PAD_ID)]  # (B, T)
    for size in range(2, n + 1):
        width = T - size + 1
        if width < 1:
            break
        code = ids[:, :width]
        for k in range(1, size):
            code = code * NGRAM_PRIMES[k - 1] + ids[:, k : k + width]
        code = vocab_size + torch.remainder(code, buckets)  # (B, width)
        real = steps[:, :width] + (size - 1) < lengths.unsqueeze(1)  # the n-gram ends on a real token
        features.append(torch.where(real, code, PAD_ID))
    flat = torch.cat(features, dim=1)  # (B, F)
    # Presence, not counts (as in NB-SVM): sort, and blank each feature equal to its left neighbour.
    flat = torch.sort(flat, dim=1).values
    repeat = torch.cat([torch.zeros_like(flat[:, :1], dtype=torch.bool), flat[:, 1:] == flat[:, :-1]], dim=1)
    return flat.masked_fill(repeat, PAD_ID)


def ngram_logits(
    weights: nn.Embedding,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    cfg: ModelConfig,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The wide path: (B, T) token ids -> (B, C), the sum of the weights of the n-grams each text holds
    (the padding row is zero and stays zero), each times its naive Bayes ratio when `scale` is given."""
    vocab_size = weights.num_embeddings - cfg.ngram_buckets
    features = ngram_ids(ids, lengths, cfg.ngrams, vocab_size, cfg.ngram_buckets)  # (B, F)
    if scale is None:
        return weights(features).sum(1)
    return (weights(features) * F.embedding(features, scale)).sum(1)  # (B, F, C) -> (B, C)


def naive_bayes_scale(
    batches: Iterable[dict[str, torch.Tensor]], cfg: ModelConfig, vocab_size: int, num_classes: int
) -> tuple[torch.Tensor, int]:
    """model.ngram_weighting nb: (V + buckets, C) |log-count ratio| of each n-gram feature for each class
    against the rest (Wang & Manning 2012), from labelled batches (ids, lengths, labels); and the number
    of texts counted. Presence, not counts, with add-one smoothing; the padding row is 0.

    With Adam, scaling a feature by r is close to giving it an r-times larger step: the n-grams that tell
    the classes apart learn first, which is what makes NB-weighted logistic regression the strong
    linear baseline. For two classes both columns are the same ratio."""
    counts = torch.zeros(num_classes, vocab_size + cfg.ngram_buckets)  # (C, V + buckets)
    texts = 0
    for batch in batches:
        features = ngram_ids(batch["ids"], batch["lengths"], cfg.ngrams, vocab_size, cfg.ngram_buckets)
        classes = batch["labels"].long().unsqueeze(1).expand_as(features)  # (B, F)
        counts.index_put_((classes, features), torch.ones(features.shape), accumulate=True)
        texts += len(features)
    counts[:, PAD_ID] = 0
    inside = counts + 1  # texts of class c holding the feature
    outside = counts.sum(0, keepdim=True) - counts + 1  # texts of the other classes holding it
    ratio = (inside / inside.sum(1, keepdim=True)).log() - (outside / outside.sum(1, keepdim=True)).log()
    ratio = ratio.abs()
    ratio[:, PAD_ID] = 0
    return ratio.T.contiguous(), texts


class LanguageModel(nn.Module):
    """The classifier's own encoder, trained to predict the next token (forward direction) and the
    previous token (backward direction) — what `seqtrain pretrain` trains and `model.init_from` loads.

    `encoder` is a `Classifier` without a head, so its parameter names (`encoder.embedding.weight`,
    `encoder.layers.0.0.weight_ih_l0`, ...) are the classifier's with a prefix. Each direction has its
    own output layer over the vocabulary:

    - `sampled` (default): sampled softmax with negatives shared by the whole batch (Jean et al. 2015),
      drawn from a log-uniform (Zipf) proposal — word ids are sorted by frequency — and corrected by
      log Q. Per step it costs (positions x num_samples x H) instead of (positions x vocabulary x H).
    - `adaptive`: torch's `nn.AdaptiveLogSoftmaxWithLoss` (Grave et al. 2017): frequent words in a
      small head, rare ones in smaller clusters.
    - `full`: the whole softmax (the reference both are measured against).

    Held-out perplexity is always the exact, full-vocabulary figure (`nll(..., exact=True)`).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        softmax: str = "sampled",
        num_samples: int = 1024,
        cutoffs: list[int] | None = None,
        init: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = Classifier(cfg, vocab_size, 0, init)
        self.softmax, self.num_samples, self.vocab_size = softmax, num_samples, vocab_size
        H, directions = cfg.hidden_size, self.encoder.directions
        if softmax == "adaptive":
            cuts = [c for c in (cutoffs or [2000, 10000]) if c < vocab_size - 1]
            self.adaptive = nn.ModuleList(
                nn.AdaptiveLogSoftmaxWithLoss(H, vocab_size, cuts, div_value=4.0) for _ in range(directions)
            )
        else:
            self.out_weight = nn.Parameter(torch.randn(directions, vocab_size, H) / H**0.5)  # (D, V, H)
            self.out_bias = nn.Parameter(torch.zeros(directions, vocab_size))  # (D, V)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The training objective (what DDP wraps): see `nll`."""
        return self.nll(ids, lengths)

    def targets(
        self, ids: torch.Tensor, lengths: torch.Tensor, states: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each direction, (hidden states (N, H), target ids (N,)) at every step that has a target."""
        H = self.encoder.cfg.hidden_size
        T = ids.shape[1]
        has_next = torch.arange(1, T, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T-1)
        # forward: the state at step t (read 0..t) predicts token t+1
        pairs = [(states[:, :-1, :H][has_next], ids[:, 1:][has_next])]
        if self.encoder.directions == 2:
            # backward: the state at step t >= 1 (read t..length-1) predicts token t-1
            pairs.append((states[:, 1:, H:][has_next], ids[:, :-1][has_next]))
        return pairs

    def nll(self, ids: torch.Tensor, lengths: torch.Tensor, exact: bool = False) -> tuple[torch.Tensor, int]:
        """ids (B, T), lengths (B,) -> (summed negative log-likelihood per direction (D,), targets per
        direction).
        exact=True scores against the whole vocabulary (evaluation); else the training objective."""
        states = self.encoder.dropout(self.encoder.encode(ids, lengths))  # (B, T, D*H)
        losses = []
        count = 0
        for d, (h, y) in enumerate(self.targets(ids, lengths, states)):
            count = len(y)
            if self.softmax == "adaptive":
                losses.append(-self.adaptive[d](h, y).output.sum())  # exact log-probabilities
            elif exact or self.softmax == "full":
                losses.append(full_softmax_nll(h, y, self.out_weight[d], self.out_bias[d]))
            else:
                losses.append(
                    sampled_softmax_nll(h, y, self.out_weight[d], self.out_bias[d], self.num_samples)
                )
        total = torch.stack(losses)
        if count == 0:  # only one-token texts: keep the graph connected so backward (and DDP) still run
            total = total + 0.0 * states.sum()
        return total, count


def full_softmax_nll(
    h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Summed -log p(y | h) over the whole vocabulary, 4,096 positions at a time: h (N, H), weight (V, H)."""
    total = h.new_zeros(())
    for start in range(0, len(y), 4096):
        logits = torch.addmm(bias, h[start : start + 4096], weight.t())  # (n, V)
        total = total + F.cross_entropy(logits.float(), y[start : start + 4096], reduction="sum")
    return total


def sampled_softmax_nll(
    h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int
) -> torch.Tensor:
    """Summed sampled-softmax loss: the true word against k negatives shared by all N positions.

    Negatives are drawn with replacement from the log-uniform distribution P(w) = log((w+2)/(w+1)) / log(V+1);
    every logit is corrected by -log(k P(w)), so the loss estimates the full softmax's (Jean et al. 2015).
    A negative that is the position's own target is masked out."""
    V = weight.shape[0]
    log_range = math.log(V + 1)
    neg = (torch.exp(torch.rand(k, device=h.device) * log_range).long() - 1).clamp_(0, V - 1)  # (k,)

    def log_expected(w: torch.Tensor) -> torch.Tensor:
        return torch.log(k * (torch.log1p(1.0 / (w.to(h.dtype) + 1.0)) / log_range))

    true_logit = (h * weight[y]).sum(-1) + bias[y] - log_expected(y)  # (N,)
    neg_logit = torch.addmm(bias[neg], h, weight[neg].t()) - log_expected(neg)  # (N, k)
    neg_logit = neg_logit.masked_fill(neg.unsqueeze(0) == y.unsqueeze(1), float("-inf"))
    logits = torch.cat(
        [true_logit.unsqueeze(1), neg_logit], dim=1
    ).float()  # (N, 1 + k); the target is column 0
    return F.cross_entropy(logits, torch.zeros_like(y), reduction="sum")


def build_model(
    cfg: ModelConfig, vocab_size: int, num_classes: int, init: bool = True, *, data: DataConfig | None = None
) -> Classifier:
    """data: the run's data config, which data.ngram_max_length needs (None: both paths read the same ids)."""
    return Classifier(cfg, vocab_size, num_classes, init, data)


def load_pretrained_embeddings(
    model: Classifier, path: str, vocab: dict[str, int], lowercase: bool
) -> tuple[int, int]:
    """Copy vectors of vocabulary words from a GloVe / word2vec text file; returns (found, vocabulary size).

    The file is streamed line by line, so a multi-GB vectors file costs no more memory than the
    vectors we keep. Words missing from the file keep their random initialisation.
    """
    from seqtrain.errors import DataError

    weight = model.embedding.weight
    dim = weight.shape[1]
    found = 0
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                parts = line.rstrip().split(" ")
                if n == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    continue  # word2vec header: "count dim"
                if len(parts) != dim + 1:
                    raise DataError(
                        f"{path}, line {n}: {len(parts) - 1} numbers, but model.embedding_dim is {dim}. "
                        "Set model.embedding_dim to the vectors' dimension."
                    )
                word = parts[0].lower() if lowercase else parts[0]
                idx = vocab.get(word)
                if idx is None or idx == PAD_ID:
                    continue
                try:
                    vec = torch.tensor([float(x) for x in parts[1:]])
                except ValueError:
                    raise DataError(f"{path}, line {n}: not a word followed by numbers.") from None
                with torch.no_grad():
                    weight[idx] = vec
                found += 1
    except FileNotFoundError:
        raise DataError(f"model.pretrained_embeddings: {path!r} does not exist.") from None
    return found, len(vocab)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
