"""Accuracy results table: `python -m bench.results RUN_DIR [RUN_DIR ...]`.

Groups run directories by config name (`name` without the `-s<seed>` suffix) and writes, per
group: validation accuracy (or MAE / Spearman for regression) as mean ± std over the seeds, wall
time, training tokens/s and the command, into BENCHMARKS.md between the `bench.results` markers
under `## Accuracy` (without the markers, right below the heading; text around them is kept). For
SST-2 runs it also reports accuracy on the long validation phrases (>= 15 words), a proxy for the
sentence-level test set that is held out of ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.common import write_between_markers
from seqtrain.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Accuracy"


def long_phrase_accuracy(run_dir: Path, min_words: int = 15) -> tuple[float, int]:
    from seqtrain.data import open_split
    from seqtrain.inference.run import load_run, predict_probs

    run, _ = load_run(run_dir)
    data = run.config.data
    texts, labels = [], []
    for row in open_split(data, data.eval_split):
        if len(str(row[data.text_column]).split()) >= min_words:
            texts.append(row[data.text_column])
            labels.append(run.labels.target(row[data.label_column]))
    probs = predict_probs(run, texts)
    return float((probs.argmax(1) == np.array(labels)).mean()), len(texts)


def summarize(run_dir: Path) -> dict[str, Any]:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    ev = json.loads((run_dir / f"eval-{cfg['data']['eval_split']}.json").read_text())
    train_lines = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    tps = statistics.mean(r["tokens_per_sec"] for r in train_lines) if train_lines else float("nan")
    out = {
        "name": re.sub(r"-s\d+$", "", cfg["name"]),
        "seed": cfg["seed"],
        "eval": ev,
        "tokens_per_sec": tps,
        "seconds": ev.get("train_seconds", float("nan")),
        "threads": ev.get("threads"),
        "cfg": cfg,
    }
    if "sst2" in cfg["data"]["path"] and ev.get("task", "classification") == "classification":
        out["long_acc"], out["long_n"] = long_phrase_accuracy(run_dir)
    return out


def fmt(values: list[float], pct: bool = True) -> str:
    k = 100 if pct else 1
    mean = statistics.mean(values) * k
    sd = statistics.stdev(values) * k if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {sd:.2f}" if len(values) > 1 else f"{mean:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    a = p.parse_args(argv)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in a.runs:
        groups[(s := summarize(run))["name"]].append(s)
    rows = [
        "| config | seeds | validation result | wall time / run | train tokens/s | threads |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in sorted(groups.items()):
        ev = [r["eval"] for r in runs]
        if ev[0].get("task") == "regression":
            result = (
                f"MAE {fmt([e['mae'] for e in ev], False)}, "
                f"Spearman {fmt([e['spearman'] for e in ev], False)}"
            )
        else:
            result = f"accuracy {fmt([e['accuracy'] for e in ev])}%"
            if "long_acc" in runs[0]:
                result += (
                    f"; phrases ≥ 15 words ({runs[0]['long_n']:,}): {fmt([r['long_acc'] for r in runs])}%"
                )
            if "top_k_accuracy" in ev[0]:
                result += f"; top-{ev[0]['top_k']} {fmt([e['top_k_accuracy'] for e in ev])}%"
        minutes = statistics.mean(r["seconds"] for r in runs) / 60
        rows.append(
            f"| `configs/{name}.yaml` | {', '.join(str(r['seed']) for r in runs)} | {result} "
            f"| {minutes:.1f} min "
            f"| {statistics.mean(r['tokens_per_sec'] for r in runs):,.0f} | {runs[0]['threads']} |"
        )
    section = "\n".join(
        [
            "Validation splits of ../shared/data, from scratch (no pretrained embeddings). "
            "One row per shipped config; mean ± std over the seeds listed. "
            "Command for seed N: `seqtrain train configs/NAME.yaml seed=N name=NAME-sN` "
            "(then `python -m bench.results runs/*` writes this table). "
            "Wall time includes the vocabulary pass and every evaluation; "
            "`threads` is the intra-op thread count of the run (runs made with 1 thread shared the machine "
            "with other work; with 2 threads on an idle 2-core machine they run about 1.6x faster).",
            "",
            *rows,
            "",
        ]
    )
    print(section)
    write_between_markers(a.output, HEADING, "bench.results", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
