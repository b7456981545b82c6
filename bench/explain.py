"""Are the explanations faithful? `python -m bench.explain --run sst2=RUN_DIR --run imdb=RUN_DIR` (issue 20).

For each run, on a random sample of its validation split (seed 0):

- speed: texts/s of `explain_texts` with occlusion (run directory, and its ONNX export when
  onnxruntime is installed) and with integrated gradients, on this machine's threads;
- the deletion test: remove the k highest-scored tokens (k = 1..10) and measure the drop of the
  predicted class's probability; AOPC@10 is its mean over k and texts, against removing k random
  tokens (the mean of 3 random orders). Target: each method at least 3x random;
- the model randomisation check (Adebayo et al., 2018): the same texts explained by a model with
  re-initialised weights (same architecture, same explained class); mean Spearman correlation, per
  text, between its token scores and the trained model's. Target: below 0.3.

The generated table goes into BENCHMARKS.md between the `<!-- bench.explain:begin -->` and
`<!-- bench.explain:end -->` markers under its heading; prose written around them is kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import common
from bench.reference import read_split
from seqtrain.explain import (
    Explanation,
    deletion_drops,
    explain_texts,
    integrated_gradients,
    occlusion,
    spearman,
)
from seqtrain.inference import Run, load_run
from seqtrain.model import build_model

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Explanations: faithfulness (issue 20)"
BEGIN, END = common.markers("bench.explain")
METHODS = ("occlusion", "integrated-gradients")
K = 10


def say(msg: str) -> None:
    print(f"[bench.explain {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sample_texts(run: Run, n: int, seed: int = 0) -> list[str]:
    texts, _ = read_split(run.config, run.config.data.eval_split, None)
    texts = [t for t in texts if t.strip()]
    pick = np.random.default_rng(seed).choice(len(texts), size=min(n, len(texts)), replace=False)
    return [texts[i] for i in sorted(pick)]


def reinitialised(run: Run, seed: int = 1) -> Run:
    """The same run with freshly initialised weights (embeddings, recurrent layers, head)."""
    torch.manual_seed(seed)
    model = (
        build_model(run.config.model, run.tokenizer.get_vocab_size(), run.labels.outputs, init=True)
        .to(run.device)
        .eval()
    )
    return dataclasses.replace(run, model=model)


def scores_of(run: Run, explained: list[Explanation], method: str, steps: int) -> list[np.ndarray]:
    """Scores of `run` for the texts and target classes already in `explained` (for the randomised model)."""
    encoded, targets = [ex.encoded for ex in explained], [ex.target for ex in explained]
    if method == "occlusion":
        return [d[:, t] for d, t in zip(occlusion(run, encoded)[1], targets, strict=True)]
    return integrated_gradients(run, encoded, targets, steps)[0]


def mean_spearman(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float, int]:
    values = [spearman(x, y) for x, y in zip(a, b, strict=True) if len(x) >= 3]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)), len(values)


def onnx_speed(run: Run, texts: list[str]) -> float | None:
    """texts/s of occlusion on the run's ONNX export (None without the export extra)."""
    try:
        import onnxruntime  # noqa: F401

        from seqtrain.export import export_run
        from seqtrain.exported import load_exported_run
    except ImportError:
        return None
    with tempfile.TemporaryDirectory(prefix="seqtrain-bench-explain-") as tmp:
        export_run(run.dir, "onnx", Path(tmp) / "onnx")
        exported = load_exported_run(Path(tmp) / "onnx")
        explain_texts(exported, texts[:8])  # warm-up: onnxruntime plans its first shapes
        start = time.perf_counter()
        explain_texts(exported, texts)
        return len(texts) / (time.perf_counter() - start)


def bench_run(
    name: str, run_dir: Path, n: int, reinit_n: int, onnx_n: int, steps: int
) -> list[dict[str, Any]]:
    run, _ = load_run(run_dir)
    texts = sample_texts(run, n)
    say(f"{name}: {len(texts)} validation texts from {run_dir}")
    rows: list[dict[str, Any]] = []
    random_run = reinitialised(run)
    rng = np.random.default_rng(0)
    random_aopc: float | None = None
    random_longer = float("nan")
    for method in METHODS:
        start = time.perf_counter()
        explained = explain_texts(run, texts, method, steps=steps)
        speed = len(texts) / (time.perf_counter() - start)
        encoded, targets = [ex.encoded for ex in explained], [ex.target for ex in explained]
        drops = deletion_drops(run, encoded, [ex.scores for ex in explained], targets, K)
        if random_aopc is None:
            random_drops = [
                deletion_drops(run, encoded, [rng.random(len(e.ids)) for e in encoded], targets, K)
                for _ in range(3)
            ]
            random_curve = np.mean([d.mean(0) for d in random_drops], axis=0)
            random_aopc = float(random_curve.mean())
            random_longer = float(
                np.mean([d[[len(e.spans) > K for e in encoded]].mean() for d in random_drops])
            )
        longer = np.array([len(e.spans) > K for e in encoded])  # texts that removing K tokens does not empty
        say(
            f"{name} {method}: {speed:.1f} texts/s, AOPC@{K} {drops.mean():.4f} (random {random_aopc:.4f}); randomised model ..."
        )
        sub = explained[:reinit_n]
        rho, counted = mean_spearman([ex.scores for ex in sub], scores_of(random_run, sub, method, steps))
        rows.append(
            {
                "data": name,
                "texts": len(texts),
                "tokens": float(np.mean([len(e.spans) for e in encoded])),
                "method": method,
                "texts_per_s": speed,
                "onnx_texts_per_s": onnx_speed(run, texts[:onnx_n]) if method == "occlusion" else None,
                "onnx_texts": min(onnx_n, len(texts)),
                "curve": drops.mean(0),
                "aopc": float(drops.mean()),
                "random_curve": random_curve,
                "random_aopc": random_aopc,
                "spearman": rho,
                "spearman_texts": counted,
                "longer": int(longer.sum()),
                "aopc_longer": float(drops[longer].mean()),
                "random_longer": random_longer,
                "accuracy": run_accuracy(run_dir),
            }
        )
        say(f"{name} {method}: Spearman with the re-initialised model {rho:.3f} over {counted} texts")
    return rows


def run_accuracy(run_dir: Path) -> float | None:
    import json

    files = sorted(run_dir.glob("eval-*.json"))
    return json.loads(files[0].read_text()).get("accuracy") if files else None


def table(
    rows: list[dict[str, Any]],
    runs: dict[str, Path],
    args: argparse.Namespace,
    seconds: float,
    load: tuple[float, ...],
) -> str:
    out = [
        f"Generated by `python -m bench.explain {' '.join(f'--run {k}={v}' for k, v in runs.items())} --texts {args.texts} "
        f"--reinit-texts {args.reinit_texts} --steps {args.steps}`; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); {seconds / 60:.1f} min; "
        f"load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other work shared the machine when above the threads).",
        "",
        f"| data (model accuracy) | texts (mean tokens) | method | texts/s | AOPC@{K} | random AOPC@{K} | ratio (≥ 3) "
        f"| drop at k = 1, 2, 5, 10 | random at k = 1, 2, 5, 10 | texts with > {K} tokens: AOPC@{K}, random, ratio "
        f"| Spearman vs re-initialised model (< 0.3) |",
        "|---|---:|---|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for r in rows:
        acc = f" ({r['accuracy']:.1%})" if r["accuracy"] is not None else ""
        speed = f"{r['texts_per_s']:,.1f}"
        if r["onnx_texts_per_s"] is not None:
            speed += f"; ONNX export {r['onnx_texts_per_s']:,.1f} ({r['onnx_texts']} texts)"
        ratio = r["aopc"] / r["random_aopc"] if r["random_aopc"] > 0 else float("inf")
        longer = (
            f"{r['longer']:,} texts: {r['aopc_longer']:.4f}, {r['random_longer']:.4f}, "
            f"{r['aopc_longer'] / r['random_longer']:.2f}"
            if r["longer"]
            else "none"
        )
        curve, random_curve = (
            ", ".join(f"{c[i]:.3f}" for i in (0, 1, 4, 9)) for c in (r["curve"], r["random_curve"])
        )
        out.append(
            f"| {r['data']}{acc} | {r['texts']:,} ({r['tokens']:.0f}) | {r['method']} | {speed} | {r['aopc']:.4f} | "
            f"{r['random_aopc']:.4f} | {ratio:.2f} {'✓' if ratio >= 3 else '✗'} | "
            f"{curve} | {random_curve} | {longer} | "
            f"{r['spearman']:.3f} {'✓' if r['spearman'] < 0.3 else '✗'} ({r['spearman_texts']} texts) |"
        )
    return "\n".join(out)


def write_between_markers(path: Path, block: str) -> None:
    """Replace what lies between BEGIN and END; without the markers, add them under HEADING (bench.common)."""
    common.write_between_markers(path, HEADING, "bench.explain", block)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.explain", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="NAME=RUN_DIR",
        help="a trained run to explain, e.g. sst2=runs/quickstart",
    )
    p.add_argument("--texts", type=int, default=1000, help="validation texts per run (random sample, seed 0)")
    p.add_argument(
        "--reinit-texts", type=int, default=1000, help="of those, how many the re-initialised model explains"
    )
    p.add_argument(
        "--onnx-texts",
        type=int,
        default=200,
        help="of those, how many occlusion explains on the ONNX export (speed only)",
    )
    p.add_argument("--steps", type=int, default=32, help="integrated gradients: points on the path")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = dict(item.split("=", 1) for item in args.run)
    started, load = time.perf_counter(), os.getloadavg()
    rows = [
        r
        for name, d in runs.items()
        for r in bench_run(name, Path(d), args.texts, args.reinit_texts, args.onnx_texts, args.steps)
    ]
    block = table(rows, {k: Path(v) for k, v in runs.items()}, args, time.perf_counter() - started, load)
    print(block)
    write_between_markers(args.output, block)
    say(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
