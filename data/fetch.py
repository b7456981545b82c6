"""Materialise data/imdb and data/sst2 in the Hub layout (see data/README.md).

    python data/fetch.py [--dest data] [--mirror PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

DATASETS = {"imdb": "stanfordnlp/imdb", "sst2": "stanfordnlp/sst2", "imdb-unlabeled": "stanfordnlp/imdb"}
# The columns each labelled dataset keeps, where its source has them (the Hub's IMDB has no `rating`).
COLUMNS = {"imdb": ("text", "label", "rating"), "sst2": ("sentence", "label")}
NO_RATING = (
    "{out}: the Hub's {hub_id} has no `rating` column (star ratings), only the binary label, so "
    "configs/imdb-rating-*.yaml cannot train on it (they stop at once: no column 'rating'). For the "
    "ratings, set SEQTRAIN_DATA_MIRROR to a copy of the IMDB data with them (see data/README.md)."
)


def from_mirror(mirror: Path, dest: Path, name: str) -> bool:
    src = mirror / name
    shards = sorted(src.glob("*.parquet"))
    if not shards:
        return False
    out = dest / name
    out.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        target = out / shard.name
        if not target.exists() or target.stat().st_size != shard.stat().st_size:
            tmp = target.with_suffix(".tmp")
            shutil.copyfile(shard, tmp)
            os.replace(tmp, target)
    print(f"{out}: {len(shards)} shard(s) copied from {src}")
    return True


def from_hub(dest: Path, name: str) -> None:
    import datasets

    hub_id = DATASETS[name]
    if name == "imdb-unlabeled":  # the 50,000 reviews without labels, text only
        unsup = datasets.load_dataset(hub_id, split="unsupervised").select_columns(["text"])
        labelled = {
            t for split in ("train", "test") for t in datasets.load_dataset(hub_id, split=split)["text"]
        }
        before = len(unsup)
        unsup = unsup.filter(lambda row: row["text"] not in labelled)  # as the mirror: no labelled review
        print(f"{name}: left out {before - len(unsup):,} unlabeled reviews that are also labelled ones")
        out = dest / name
        out.mkdir(parents=True, exist_ok=True)
        for i in range(4):
            unsup.shard(4, i, contiguous=True).to_parquet(str(out / f"train-{i:05d}-of-00004.parquet"))
        print(f"{out}: written from the Hub ({hub_id}, unsupervised split)")
        return
    full = datasets.load_dataset(hub_id, split="train")
    full = full.remove_columns([c for c in full.column_names if c not in COLUMNS[name]])
    parts = full.train_test_split(test_size=5000 if name == "imdb" else 6735, seed=0)
    out = dest / name
    if name == "imdb" and "rating" not in full.column_names:
        print(NO_RATING.format(out=out, hub_id=hub_id), file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    for split, ds in (("train", parts["train"]), ("validation", parts["test"])):
        n = 4 if split == "train" and name == "imdb" else 1
        for i in range(n):
            ds.shard(n, i, contiguous=True).to_parquet(str(out / f"{split}-{i:05d}-of-{n:05d}.parquet"))
    print(f"{out}: written from the Hub ({hub_id})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dest", default=str(Path(__file__).resolve().parent))
    p.add_argument("--mirror", default=os.environ.get("SEQTRAIN_DATA_MIRROR", ""))
    args = p.parse_args()
    dest = Path(args.dest)
    default_mirror = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    mirror = Path(args.mirror) if args.mirror else default_mirror
    for name in DATASETS:
        if mirror.is_dir() and from_mirror(mirror, dest, name):
            continue
        try:
            from_hub(dest, name)
        except Exception as e:  # no network, no mirror: say what to do
            print(f"cannot fetch {name}: no mirror at {mirror} and the Hub failed ({e}). "
                  "Set SEQTRAIN_DATA_MIRROR to a folder holding imdb/, sst2/ and imdb-unlabeled/.",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
