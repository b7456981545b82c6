"""A fresh run on unlabeled text, for both of `seqtrain pretrain`'s objectives (a language model,
pretrain.py; word vectors, vectors.py): the run directory claimed, the texts read once for the
vocabulary, tokenizer.json, config.yaml and run.json written."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from seqtrain import checkpoint, console
from seqtrain.config import Config, dump_yaml
from seqtrain.data import build_text_vocab, text_sources
from seqtrain.training.init_from import init_from_pretrained
from seqtrain.training.run_dir import claim, steps_per_epoch

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def prepare_text_run(
    cfg: Config, workers: int, world: int, config_path: str, *, kind: str
) -> tuple[Tokenizer, dict[str, Any]]:
    """A fresh run: refuse to overwrite one, read the texts once, write the run's files (run.json says
    `kind`: checkpoint.LANGUAGE_MODEL, or vectors.VECTORS_KIND)."""
    run_dir = cfg.run_dir
    claim(run_dir, "pretrain", config_path)
    started = time.perf_counter()
    # model.init_from: continue from that language model, with its tokenizer (ULMFiT's second stage)
    given = init_from_pretrained(cfg)[0] if cfg.model.init_from else None
    tokenizer, rows, chunk_rows, bad = build_text_vocab(cfg, given)
    names = [f"{data.path}:{split}" for data, split in text_sources(cfg)]
    run_info = {
        **checkpoint.run_marker(),
        "kind": kind,
        "num_train_examples": rows,
        "steps_per_epoch": steps_per_epoch(chunk_rows, cfg.train.batch_size),
        "vocab_size": tokenizer.get_vocab_size(),
        "bad_rows": dict(bad),
        "workers": workers,
        "world": world,
        "sources": names,
        "torch": torch.__version__,
    }
    checkpoint.write_bytes_atomic(run_dir / "tokenizer.json", tokenizer.to_str().encode())
    checkpoint.write_bytes_atomic(run_dir / "config.yaml", dump_yaml(cfg).encode())
    checkpoint.write_json_atomic(run_dir / "run.json", run_info)
    console.info(
        f"vocabulary {tokenizer.get_vocab_size():,} tokens from {rows:,} texts ({', '.join(names)})"
        f"{f', skipped {dict(bad)}' if bad else ''} ({time.perf_counter() - started:.1f}s)"
    )
    return tokenizer, run_info
