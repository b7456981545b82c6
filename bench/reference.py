"""The plain-PyTorch side of `make bench`: the bare model, its training step, batches and rates.

`Reference` is Embedding -> one nn.LSTM / nn.GRU / nn.RNN layer -> Linear, as a tutorial writes it.
The training benchmark runs it three ways ((b) packed, (c) padded on random batches, (d) the bare
kernel loop on seqtrain's own batches); the predict benchmark runs its forward pass alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

from seqtrain.config import Config
from seqtrain.data import open_split
from seqtrain.encoding import PAD_ID, UNK_ID

CELLS: dict[str, Callable[..., nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}

# The shapes the speed benchmarks fix (--quick cuts texts to a shorter max_length instead of MAX_LENGTH).
EMBEDDING, HIDDEN, BATCH, MAX_LENGTH = 128, 256, 64, 400


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) int64, right-padded with PAD_ID
    lengths: torch.Tensor  # (B,) int64, real tokens per row
    labels: torch.Tensor  # (B,) int64

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def padded(self) -> int:
        return self.ids.numel()


@dataclass
class Rate:
    tokens: int  # real tokens in the measured steps
    padded: int  # B * T summed over the measured steps
    seconds: float
    wait: float = 0.0  # seconds spent waiting for data (seqtrain only)
    shapes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def per_sec(self) -> float:
        return self.tokens / self.seconds

    @property
    def padding(self) -> float:
        return 1.0 - self.tokens / self.padded

    @property
    def data_wait(self) -> float:
        return self.wait / self.seconds


def timed_steps(step: Callable[[Batch], None], batches: list[Batch], warmup: int) -> Rate:
    """Run `step` on the first `warmup` batches untimed, then time it on the rest."""
    for b in batches[:warmup]:
        step(b)
    measured = batches[warmup:]
    t0 = time.perf_counter()
    for b in measured:
        step(b)
    seconds = time.perf_counter() - t0
    return Rate(
        sum(b.tokens for b in measured),
        sum(b.padded for b in measured),
        seconds,
        shapes=[(b.ids.shape[0], b.ids.shape[1]) for b in measured],
    )


def median_rate(rates: list[Rate]) -> Rate:
    """The run with the median tokens/s (the lower middle one of an even count)."""
    return sorted(rates, key=lambda r: r.per_sec)[(len(rates) - 1) // 2]


class Reference(nn.Module):
    """Embedding -> one nn.LSTM / nn.GRU / nn.RNN layer -> Linear, as a tutorial writes it."""

    def __init__(self, cell: str, vocab_size: int, num_classes: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, EMBEDDING, padding_idx=PAD_ID)
        self.rnn = CELLS[cell](EMBEDDING, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, num_classes)

    def forward_packed(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(b): ids (B, T), lengths (B,) on the CPU -> logits (B, C) from the last hidden state h_n."""
        x = self.embedding(ids)  # (B, T, E)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)  # LSTM: (h_n, c_n); GRU/RNN: h_n. h_n is (layers, B, H), in the batch's order
        h_n = h[0] if isinstance(h, tuple) else h
        return self.head(h_n[-1])  # (B, C)

    def forward_padded(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(c), (d) and the predict bench's bare forward: ids (B, T) -> logits (B, C) from each row's
        last real step."""
        out, _ = self.rnn(self.embedding(ids))  # (B, T, H): padding is on the right, after the real steps
        last = out[torch.arange(ids.shape[0]), lengths - 1]  # (B, H)
        return self.head(last)  # (B, C)


def training_step(
    model: Reference, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], fused: bool = False
) -> Callable[[Batch], None]:
    """Forward, cross-entropy, backward, AdamW step: nothing else (no clipping, no dropout, no logging).

    The references (b, c) use AdamW as people write it; the bare kernel loop (d) uses the fused AdamW
    that seqtrain uses. It does less work than seqtrain's step, yet it is not an upper bound: (a) has
    measured above (d).
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, fused=fused)

    def step(b: Batch) -> None:
        loss = F.cross_entropy(forward(b.ids, b.lengths), b.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def fresh_model(cell: str, vocab_size: int) -> Reference:
    torch.manual_seed(0)
    return Reference(cell, vocab_size).train()


def random_batches(seqs: list[list[int]], labels: list[int], n: int, seed: int = 0) -> list[Batch]:
    """`n` batches of BATCH texts drawn at random (no length bucketing), right-padded to their longest."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        idx = rng.choice(len(seqs), size=BATCH, replace=False)
        ids = pad_sequence(
            [torch.tensor(seqs[i]) for i in idx], batch_first=True, padding_value=PAD_ID
        )  # (B, T)
        lengths = torch.tensor([len(seqs[i]) for i in idx])  # (B,)
        out.append(Batch(ids, lengths, torch.tensor([labels[i] for i in idx])))
    return out


def read_split(cfg: Config, split: str, limit: int | None) -> tuple[list[str], list[int]]:
    """Texts and integer labels of a split, read with seqtrain's own reader (untimed)."""
    ds = open_split(cfg.data, split, limit).select_columns([cfg.data.text_column, cfg.data.label_column])
    texts, labels = [], []
    for row in ds:
        texts.append(row[cfg.data.text_column])
        labels.append(int(row[cfg.data.label_column]))
    return texts, labels


def pretokenize(tokenizer_json: Path, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids with the run's tokenizer, cut to `max_length` (the head), as a tutorial would."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    return [
        e.ids[:max_length] or [UNK_ID] for e in encodings
    ]  # an empty text becomes one <unk>, as in seqtrain
