"""Word vectors from unlabeled text: `seqtrain pretrain` with `pretrain.objective: vectors`.

    train_vectors()   the run's tokenizer (built as the language model's is), its tokens -> gensim's
                      skip-gram, CBOW or fastText -> one vector per token id -> a checkpoint
    VECTORS_KIND      state.json's and run.json's "kind" for such a run: what model.init_from reads

The texts are tokenized with the run's own tokenizer, so every vector lines up with a token id and
`model.init_from` can copy the whole matrix into a classifier's embedding (the recurrent layers start
fresh). The run folder holds config.yaml, tokenizer.json, run.json, checkpoints/step-N (model.safetensors
with `embedding.weight`, (vocab, embedding_dim)) behind best/ and last/, and vectors.txt, the same
vectors in word2vec's text format for other tools (and for model.pretrained_embeddings).

gensim trains in its own C threads (train.num_threads of them) and holds the tokenized corpus in memory:
a list of token strings per text (about 100 MB for 20 million tokens).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from seqtrain import badrows, checkpoint, console
from seqtrain.config import Config, to_dict
from seqtrain.data import RowTally, pretraining_texts
from seqtrain.encoding import PAD_ID, UNK_ID
from seqtrain.errors import ConfigError
from seqtrain.runtime import Interrupted, StopSignals, seed_everything
from seqtrain.training.texts import prepare_text_run

if TYPE_CHECKING:
    from tokenizers import Tokenizer

VECTORS_KIND = checkpoint.WORD_VECTORS
ENCODE_CHUNK = 2048  # texts per tokenizer call (the tokenizer runs them in parallel)
NEIGHBOUR_PROBES = ("good", "bad", "great", "boring")  # shown after training when in the vocabulary


class WordVectors(nn.Module):
    """What the checkpoint holds: one embedding, named as a classifier's (`embedding.weight`)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(weight, freeze=True, padding_idx=PAD_ID)


def tokens_by_id(tokenizer: Tokenizer) -> list[str]:
    """The vocabulary as a list: element i is token id i's text."""
    vocab = tokenizer.get_vocab()
    names = [""] * len(vocab)
    for token, index in vocab.items():
        names[index] = token
    return names


def tokenized_corpus(cfg: Config, tokenizer: Tokenizer) -> tuple[list[list[str]], int]:
    """Every pretraining text as its tokens (padding and <unk> left out: an <unk> is no context);
    returns the corpus and the token count."""
    names = tokens_by_id(tokenizer)
    corpus: list[list[str]] = []
    tokens = 0
    pending: list[str] = []

    def flush() -> None:
        nonlocal tokens
        for encoding in tokenizer.encode_batch_fast(pending, add_special_tokens=False):
            words = [names[i] for i in encoding.ids if i not in (PAD_ID, UNK_ID)]
            if words:
                corpus.append(words)
                tokens += len(words)
        pending.clear()

    with badrows.pretrain_keys(cfg.pretrain, cfg.data):  # errors name pretrain.path, not data.path
        for text in pretraining_texts(cfg, RowTally()):
            pending.append(text)
            if len(pending) == ENCODE_CHUNK:
                flush()
    flush()
    return corpus, tokens


def stopped(stop: StopSignals) -> None:
    """After a stop signal: exit 128 + signum; no vectors are written (a run takes minutes to redo)."""
    if stop.signum is not None:
        raise Interrupted(
            f"stopped by {signal.Signals(stop.signum).name}; no vectors were written. Run seqtrain pretrain "
            "again (the folder keeps its tokenizer and config, and is reused).",
            stop.signum,
        )


def fit_vectors(cfg: Config, corpus: list[list[str]], threads: int, stop: StopSignals) -> Any:
    """gensim's model over the corpus, one log line per pass; a signal stops it after the current pass."""
    try:
        from gensim.models import FastText, Word2Vec
        from gensim.models.callbacks import CallbackAny2Vec
    except ImportError:
        raise ConfigError(
            "pretrain.objective: vectors needs gensim: pip install 'seqtrain[vectors]' (or make install)."
        ) from None
    pre = cfg.pretrain

    class Progress(CallbackAny2Vec):
        def __init__(self) -> None:
            self.epoch, self.started = 0, time.perf_counter()

        def on_epoch_end(self, model: Any) -> None:
            self.epoch += 1
            console.info(
                f"vectors: pass {self.epoch}/{pre.vectors_epochs} ({time.perf_counter() - self.started:.0f}s)"
            )
            stopped(stop)

    options: dict[str, Any] = {
        "vector_size": cfg.model.embedding_dim,
        "window": pre.vectors_window,
        "negative": pre.vectors_negative,
        "epochs": pre.vectors_epochs,
        "min_count": 1,  # the tokenizer already chose the vocabulary
        "workers": threads,
        "seed": cfg.seed,
        "sg": 0 if pre.vectors_algorithm == "cbow" else 1,
        "callbacks": [Progress()],
    }
    if pre.vectors_algorithm == "fasttext":
        return FastText(sentences=corpus, **options)
    return Word2Vec(sentences=corpus, **options)


def aligned_matrix(trained: Any, tokenizer: Tokenizer, seed: int) -> tuple[torch.Tensor, int]:
    """(vocab, dim) vectors by token id, scaled to unit standard deviation like a fresh nn.Embedding's
    N(0, 1) rows (so dropout, adversarial eps and learning rates mean what they do from scratch);
    tokens gensim never saw get random rows of the same scale, padding a zero row. Returns it and the
    number of tokens that have a trained vector."""
    keyed = trained.wv
    vocab = tokenizer.get_vocab()
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(len(vocab), keyed.vector_size, generator=generator)  # (V, E)
    trained_rows = torch.zeros(len(vocab), dtype=torch.bool)  # (V,)
    for token, index in vocab.items():
        if token in keyed.key_to_index:
            matrix[index] = torch.from_numpy(keyed[token].copy())
            trained_rows[index] = True
    if trained_rows.any():
        matrix[trained_rows] /= matrix[trained_rows].std().clamp(min=1e-8)
    matrix[PAD_ID] = 0.0
    return matrix, int(trained_rows.sum())


def write_word2vec_text(path: Path, matrix: torch.Tensor, tokenizer: Tokenizer) -> None:
    """word2vec's text format: a `count dim` header, then `token v1 ... vdim` per line, by token id."""
    lines = [f"{matrix.shape[0]} {matrix.shape[1]}"]
    for index, token in enumerate(tokens_by_id(tokenizer)):
        lines.append(token + " " + " ".join(f"{x:.5f}" for x in matrix[index].tolist()))
    checkpoint.write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())


def neighbours(trained: Any) -> dict[str, list[str]]:
    """The nearest tokens of a few common sentiment words: a glance at what the vectors learned."""
    keyed = trained.wv
    return {
        word: [w for w, _ in keyed.most_similar(word, topn=5)]
        for word in NEIGHBOUR_PROBES
        if word in keyed.key_to_index
    }


def train_vectors(cfg: Config, resume: bool) -> dict[str, Any]:
    """pretrain.objective vectors: train the vectors, write the run; return its summary."""
    run_dir = cfg.run_dir
    if resume:
        raise ConfigError(
            "pretrain.objective: vectors takes minutes and has no --resume: run it again in a new folder "
            "(output_dir=... or name=...)."
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "pretrain.objective: vectors runs in one process (gensim uses train.num_threads threads): "
            "start it with seqtrain pretrain, not torchrun."
        )
    started = time.perf_counter()
    for name in checkpoint.lock_run_dir(run_dir, fresh=True, kind=checkpoint.LANGUAGE_MODEL):
        console.warn(f"removed {run_dir / name}, left behind by an interrupted save")
    tokenizer, run_info = prepare_text_run(cfg, 0, 1, "CONFIG", kind=VECTORS_KIND)
    seed_everything(cfg.seed)
    threads = cfg.train.num_threads or max(1, torch.get_num_threads())
    with StopSignals() as stop:
        corpus, tokens = tokenized_corpus(cfg, tokenizer)
        stopped(stop)
        console.info(
            f"vectors: {cfg.pretrain.vectors_algorithm}, {cfg.model.embedding_dim} dimensions, "
            f"{len(corpus):,} texts, {tokens:,} tokens, {threads} threads"
        )
        trained = fit_vectors(cfg, corpus, threads, stop)
        matrix, found = aligned_matrix(trained, tokenizer, cfg.seed)
        probes = neighbours(trained)
        del corpus
        write_word2vec_text(run_dir / "vectors.txt", matrix, tokenizer)
        summary = {
            "objective": "vectors",
            "algorithm": cfg.pretrain.vectors_algorithm,
            "texts": run_info["num_train_examples"],
            "tokens": tokens,
            "vocab_size": matrix.shape[0],
            "trained_vectors": found,
            "neighbours": probes,
            "train_seconds": time.perf_counter() - started,
            "threads": threads,
        }
        state = {
            "kind": VECTORS_KIND,
            "step": 0,
            "epoch": cfg.pretrain.vectors_epochs,
            "metrics": {"trained_vectors": found, "tokens": tokens},
            "model": to_dict(cfg)["model"],
            "vocab_size": matrix.shape[0],
        }
        checkpoint.save(run_dir, 0, WordVectors(matrix), None, state, best=True, keep_last=1)
        checkpoint.write_json_atomic(run_dir / "pretrain-summary.json", summary)
    for word, near in probes.items():
        console.info(f"  nearest to {word!r}: {', '.join(near)}")
    console.info(
        f"{found:,} of {matrix.shape[0]:,} tokens have a vector ({summary['train_seconds']:.0f}s); "
        f"start a classifier's embeddings from them with model.init_from: {run_dir}"
    )
    checkpoint.unlock_run_dir(run_dir)
    return summary
