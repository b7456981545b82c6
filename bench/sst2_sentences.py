"""SST-2 with a sentence-level validation split that shares no sentence with training:
`python -m bench.sst2_sentences [--out runs/data]`.

The SST-2 folder holds phrases: every sub-phrase of each treebank sentence, labelled, with train and
validation drawn from the same sentences, so validation phrases are parts of training sentences and
read high. Here:

  sentences   the phrases that are not part of a longer phrase (train and validation pooled): the
              treebank's full sentences
  held out    10% of the sentences, by a hash of the text (the same ones on every run)
  sst2-sentences/   Hub layout: train = every phrase that is not inside a held-out sentence;
                    validation = the held-out sentences
  sst2-small/       what a user with a small dataset of their own has: train.csv with SMALL_TRAIN
                    full sentences of the rest and string labels (negative / positive), and
                    validation.csv with the held-out sentences; no phrases

Both are written under --out (runs/data by default: runs/ is not committed) and reused when present.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pandas as pd

from bench.common import ROOT, data_path, say

HELDOUT = 0.10
SMALL_TRAIN = 8000
LABEL_NAMES = ["negative", "positive"]


def is_heldout(text: str) -> bool:
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < HELDOUT


def full_sentences(phrases: list[str]) -> set[str]:
    """The phrases not contained in a longer one. Longest first, each is searched for in the longer
    ones: all but the latest few thousand joined into one string (C's substring search), the latest
    one by one."""
    sentences: set[str] = set()
    joined = ""
    recent: list[str] = []
    for phrase in sorted(set(phrases), key=len, reverse=True):
        if phrase not in joined and not any(phrase in other for other in recent):
            sentences.add(phrase)
        recent.append(phrase)
        if len(recent) == 4096:
            joined, recent = joined + "\n" + "\n".join(recent), []
    return sentences


def build(out: Path) -> tuple[Path, Path]:
    """Write (or find) both folders; returns their paths."""
    hub, small = out / "sst2-sentences", out / "sst2-small"
    if (hub / "validation-00000-of-00001.parquet").exists() and (small / "validation.csv").exists():
        return hub, small
    source = data_path("sst2")
    rows = pd.concat(
        [pd.read_parquet(source / f"{split}-00000-of-00001.parquet") for split in ("train", "validation")]
    ).drop_duplicates("sentence")
    rows["sentence"] = rows["sentence"].str.strip()
    say(f"{len(rows):,} distinct phrases; finding the full sentences")
    sentences = full_sentences(rows["sentence"].tolist())
    is_sentence = rows["sentence"].isin(sentences)
    heldout = rows[is_sentence & rows["sentence"].map(is_heldout)]
    joined = "\n".join(heldout["sentence"])
    inside = rows["sentence"].map(lambda p: p in joined)  # a phrase of a held-out sentence (or one)
    train = rows[~inside]
    say(
        f"{len(sentences):,} sentences, {len(heldout):,} held out; training keeps {len(train):,} of "
        f"{len(rows):,} phrases"
    )
    hub.mkdir(parents=True, exist_ok=True)
    train.to_parquet(hub / "train-00000-of-00001.parquet", index=False)
    heldout.to_parquet(hub / "validation-00000-of-00001.parquet", index=False)
    small.mkdir(parents=True, exist_ok=True)
    rest = rows[is_sentence & ~inside].sample(frac=1.0, random_state=0)
    for name, part in (("train", rest.head(SMALL_TRAIN)), ("validation", heldout)):
        pd.DataFrame({"text": part["sentence"], "sentiment": [LABEL_NAMES[y] for y in part["label"]]}).to_csv(
            small / f"{name}.csv", index=False
        )
    return hub, small


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sst2_sentences", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "data")
    hub, small = build(p.parse_args(argv).out)
    print(f"{hub}\n{small}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
