"""Language-model pretraining speed: real tokens/s of a pretraining step beside a classifier step, and the
share of the step spent in the output layer. `python -m bench.pretrain [--threads 2] [--minutes 0]`

On real IMDB text (the first batches of the unlabeled reviews, length-bucketed as `seqtrain pretrain`
reads them), with configs/imdb-pretrain.yaml's encoder (BiLSTM-128, 30,000 words):

  classifier   configs/imdb-best's forward + backward + AdamW (no adversarial pass)
  encoder      the pretraining encoder alone: forward + backward of both directions
  sampled / adaptive / full   a whole pretraining step with that output layer

softmax share = 1 - encoder time / step time. `--minutes M` also trains each output layer for M minutes
from the same start and reports the exact held-out perplexity it reaches: perplexity per minute, which is
what matters (a faster step that learns less per step is no gain).
The table between the markers in docs/experiments/lm-pretraining.md is replaced with what this run measured.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from bench.common import write_between_markers
from seqtrain.config import load_config
from seqtrain.data import BatchStream, build_text_vocab, heldout_texts, text_sources
from seqtrain.encoding import encode
from seqtrain.model import LanguageModel, build_model
from seqtrain.optim import make_optimizer
from seqtrain.pretrain import heldout_nll

ROOT = Path(__file__).resolve().parent.parent


def timed(step: object, batches: list[dict], repeats: int = 1) -> float:
    """Best seconds per real token over `batches` (after one warm-up batch)."""
    step(batches[0])  # type: ignore[operator]
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches[1:]:
            step(batch)  # type: ignore[operator]
        best = min(best, time.perf_counter() - started)
    return best / sum(int(b["lengths"].sum()) for b in batches[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--minutes", type=float, default=0.0, help="also train each output layer this long")
    p.add_argument(
        "--texts", type=int, default=6000, help="unlabeled reviews read for the vocabulary and batches"
    )
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = load_config(
        ROOT / "configs/imdb-pretrain.yaml",
        [f"data.max_train_examples={a.texts}", "pretrain.add_train_texts=false"],
    )
    tokenizer, _, _, _ = build_text_vocab(cfg)
    vocab = tokenizer.get_vocab_size()
    stream = BatchStream(
        cfg.data,
        "train",
        tokenizer,
        None,
        cfg.train.batch_size,
        shuffle=True,
        limit=a.texts,
        sources=text_sources(cfg),
        heldout=cfg.pretrain.heldout_fraction,
    )
    batches = [b for _, b in zip(range(a.batches + 1), iter(stream), strict=False)]
    rows = []

    classifier = build_model(load_config(ROOT / "configs/imdb-best.yaml").model, vocab, 2)
    opt = make_optimizer(classifier, cfg.train)

    def classifier_step(batch: dict) -> None:
        loss = torch.nn.functional.cross_entropy(
            classifier(batch["ids"], batch["lengths"]), torch.zeros(len(batch["ids"]), dtype=torch.long)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()

    rows.append(("classifier step (imdb-best, no adversarial pass)", timed(classifier_step, batches)))
    encoder = LanguageModel(cfg.model, vocab, "sampled").encoder
    rows.append(
        (
            "encoder alone, both directions",
            timed(lambda b: encoder.encode(b["ids"], b["lengths"]).sum().backward(), batches),
        )
    )
    models = {}
    for softmax in ("sampled", "adaptive", "full"):
        torch.manual_seed(0)
        model = LanguageModel(
            cfg.model, vocab, softmax, cfg.pretrain.num_samples, cfg.pretrain.adaptive_cutoffs
        )
        lm_opt = make_optimizer(model, cfg.train)

        def lm_step(
            batch: dict, model: LanguageModel = model, lm_opt: torch.optim.Optimizer = lm_opt
        ) -> None:
            sums, n = model(batch["ids"], batch["lengths"])
            lm_opt.zero_grad()
            (sums.mean() / max(1, n)).backward()
            lm_opt.step()

        rows.append(
            (
                f"pretraining step, {softmax} softmax",
                timed(lm_step, batches[: 3 if softmax == "full" else None]),
            )
        )
        models[softmax] = (model, lm_opt, lm_step)
    encoder_time = rows[1][1]
    table = [
        f"Measured with `python -m bench.pretrain --threads {a.threads}`: {a.batches} batches of 64 "
        f"unlabeled IMDB reviews (cut at {cfg.pretrain.max_length} tokens), vocabulary {vocab:,}, "
        f"{a.threads} threads.",
        "",
        "| step | real tokens/s | output layer's share |",
        "|---|---:|---:|",
    ]
    for name, sec_per_token in rows:
        share = f"{1 - encoder_time / sec_per_token:.0%}" if name.startswith("pretraining") else ""
        table.append(f"| {name} | {1 / sec_per_token:,.0f} | {share} |")
    if a.minutes:
        heldout = encode(tokenizer, heldout_texts(cfg), text_sources(cfg)[0][0])
        table += [
            "",
            f"Held-out perplexity (exact, full softmax) after {a.minutes:g} minutes of training "
            "from the same start:",
            "",
            "| output layer | steps | held-out perplexity |",
            "|---|---:|---:|",
        ]
        for softmax in ("sampled", "adaptive"):
            model, lm_opt, lm_step = models[softmax]
            steps, started = 0, time.perf_counter()
            while time.perf_counter() - started < a.minutes * 60:
                for batch in iter(
                    BatchStream(
                        cfg.data,
                        "train",
                        tokenizer,
                        None,
                        cfg.train.batch_size,
                        shuffle=True,
                        seed=steps,
                        limit=a.texts,
                        sources=text_sources(cfg),
                        heldout=cfg.pretrain.heldout_fraction,
                    )
                ):
                    lm_step(batch)
                    steps += 1
                    if time.perf_counter() - started >= a.minutes * 60:
                        break
            nll, _ = heldout_nll(model, heldout, torch.device("cpu"))
            table.append(f"| {softmax} | {steps:,} | {math.exp(sum(nll) / len(nll)):.1f} |")
    text = "\n".join(table)
    print(text)
    write_between_markers(
        ROOT / "docs" / "experiments" / "lm-pretraining.md", "## Pretraining speed", "bench.pretrain", text
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
