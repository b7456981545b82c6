"""Are the explanations faithful? `python -m bench.explain --run sst2=RUN_DIR --run imdb=RUN_DIR`.

For each run, on a random sample of its validation split (seed 0):

- speed: texts/s of `explain_texts` with occlusion (removing tokens, the default, and replacing
  them with <unk>; the default also on the run's ONNX export when onnxruntime is installed) and
  with integrated gradients, on this machine's threads, or on a GPU with `--device cuda`;
- the deletion test: remove the k highest-scored tokens (k = 1..10) and measure the drop of the
  predicted class's probability; AOPC@10 is its mean over k and texts, against removing k random
  tokens (the mean of 3 random orders). Target: each method at least 3x random;
- what any attribution could reach in that test: the oracle, the deletion order with the largest
  AOPC@10 found per text (every order of texts up to 10 tokens, greedy above: `oracle_scores`), and
  a ceiling that needs no search (the exact oracle up to 10 tokens; above, a drop of the whole
  predicted probability at every k). A method above the exact oracle on any text is a bug;
- the same by text length (1-3, 4-10, > 10 tokens), and normalised by length: each text's drops
  averaged over k = 1..min(10, n - 1) only, so that a phrase is not counted once emptied;
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
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bench import common
from bench.reference import read_split
from seqtrain.encoding import UNK_ID
from seqtrain.explain import (
    OCCLUSION_MODE,
    Encoded,
    Explanation,
    deletion_drops,
    explain_texts,
    integrated_gradients,
    occlusion,
    spearman,
)
from seqtrain.inference.run import Run, load_run
from seqtrain.model import build_model

if TYPE_CHECKING:
    from seqtrain.inference.io import Predictor

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Explanations: faithfulness"
BEGIN, END = common.markers("bench.explain")
K = 10
EXHAUSTIVE = 10  # the oracle searches texts of up to this many tokens exactly, longer ones greedily
BUCKETS = (("1-3", 1, 3), ("4-10", 4, 10), ("> 10", 11, 1 << 30))  # text length in tokens


@dataclasses.dataclass(frozen=True)
class Method:
    method: str  # explain_texts' method
    mode: str = OCCLUSION_MODE  # occlusion: "drop" (remove the token) or "unk" (replace it with <unk>)

    @property
    def name(self) -> str:
        if self.method != "occlusion":
            return self.method
        how = "token removed" if self.mode == "drop" else "token → `<unk>`"
        return f"occlusion, {how}{' (default)' if self.mode == OCCLUSION_MODE else ''}"


METHODS = (Method("occlusion", "drop"), Method("occlusion", "unk"), Method("integrated-gradients"))


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


def scores_of(run: Run, explained: list[Explanation], method: Method, steps: int) -> list[np.ndarray]:
    """Scores of `run` for the texts and target classes already in `explained` (for the randomised
    model)."""
    encoded, targets = [ex.encoded for ex in explained], [ex.target for ex in explained]
    if method.method == "occlusion":
        drops = occlusion(run, encoded, mode=method.mode)[1]
        return [d[:, t] for d, t in zip(drops, targets, strict=True)]
    return integrated_gradients(run, encoded, targets, steps)[0]


def oracle_scores(
    model: Predictor,
    encoded: list[Encoded],
    targets: list[int],
    k_max: int = K,
    exhaustive: int = 10,
    batch_size: int = 256,
    max_rows: int = 8192,
) -> list[np.ndarray]:
    """Per text, scores whose order is the best deletion order found for the deletion test: a ceiling
    for AOPC@k_max that no attribution method can beat under this protocol.

    Texts of at most `exhaustive` tokens are searched exactly: every subset of up to k_max tokens is
    removed, and the chain of nested subsets with the largest summed drop is the order (dynamic
    programming over subsets, 2^n forwards). Longer texts are searched greedily: at each k remove the
    token whose removal lowers the explained output most given those already removed, recomputed
    after each removal (n forwards per step); that is a lower bound of their true ceiling.
    Removed tokens score k_max + 1 - k at the k-th removal, the others 0.
    """
    orders: list[list[int]] = [[] for _ in encoded]
    short = [i for i, e in enumerate(encoded) if len(e.spans) <= exhaustive]
    long = [i for i, e in enumerate(encoded) if len(e.spans) > exhaustive]

    def chunks(indices: list[int], rows_of: Any) -> Iterator[tuple[list[int], list[list[int]], np.ndarray]]:
        """(texts, their rows, the explained output of each row), max_rows rows at a time."""
        group: list[int] = []
        rows: list[list[int]] = []
        which: list[int] = []
        for i in indices:
            group.append(i)
            more = rows_of(i)
            rows.extend(more)
            which.extend([targets[i]] * len(more))
            if len(rows) >= max_rows:
                yield group, rows, model.probs(rows, batch_size)[np.arange(len(rows)), which]
                group, rows, which = [], [], []
        if group:
            yield group, rows, model.probs(rows, batch_size)[np.arange(len(rows)), which]

    def without(i: int, gone: Iterable[int]) -> list[int]:
        drop = set(gone)
        return [t for j, t in enumerate(encoded[i].ids) if j not in drop] or [UNK_ID]

    # exact: every subset of up to min(n, k_max) positions, as bit masks in order of size
    masks: dict[int, list[int]] = {}

    def masks_of(n: int) -> list[int]:
        if n not in masks:
            masks[n] = sorted(
                (m for m in range(1 << n) if bin(m).count("1") <= min(n, k_max)),
                key=lambda m: bin(m).count("1"),
            )
        return masks[n]

    def subset_rows(i: int) -> list[list[int]]:
        n = len(encoded[i].spans)
        return [without(i, (j for j in range(n) if m >> j & 1)) for m in masks_of(n)]

    for group, _, out in chunks(short, subset_rows):
        at = 0
        for i in group:
            n = len(encoded[i].spans)
            ms = masks_of(n)
            p = dict(zip(ms, out[at : at + len(ms)], strict=True))
            at += len(ms)
            best: dict[int, float] = {0: 0.0}
            back: dict[int, int] = {}
            for m in ms[1:]:
                prev = max((m & ~(1 << j) for j in range(n) if m >> j & 1), key=best.__getitem__)
                best[m], back[m] = float(p[0] - p[m]) + best[prev], prev
            size = min(n, k_max)
            m = max((m for m in ms if bin(m).count("1") == size), key=best.__getitem__, default=0)
            while m:
                orders[i].append((m ^ back[m]).bit_length() - 1)
                m = back[m]
            orders[i].reverse()

    # greedy: k_max rounds, each trying every remaining token of every long text
    for _ in range(k_max):
        active = [i for i in long if len(orders[i]) < len(encoded[i].spans)]
        if not active:
            break
        remaining = {i: [j for j in range(len(encoded[i].spans)) if j not in orders[i]] for i in active}

        def candidate_rows(i: int) -> list[list[int]]:
            return [without(i, [*orders[i], j]) for j in remaining[i]]  # noqa: B023

        for group, _, out in chunks(active, candidate_rows):
            at = 0
            for i in group:
                r = remaining[i]
                orders[i].append(r[int(np.argmin(out[at : at + len(r)]))])
                at += len(r)

    scores = []
    for e, order in zip(encoded, orders, strict=True):
        s = np.zeros(len(e.spans), np.float32)
        s[order] = k_max + 1 - np.arange(len(order))
        scores.append(s)
    return scores


def mean_spearman(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float, int]:
    values = [spearman(x, y) for x, y in zip(a, b, strict=True) if len(x) >= 3]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)), len(values)


def onnx_speed(run: Run, texts: list[str]) -> float | None:
    """texts/s of occlusion on the run's ONNX export (None without the export extra)."""
    try:
        import onnxruntime  # noqa: F401

        from seqtrain.export import export_run
        from seqtrain.inference.onnx import load_exported_run
    except ImportError:
        return None
    with tempfile.TemporaryDirectory(prefix="seqtrain-bench-explain-") as tmp:
        export_run(run.dir, "onnx", Path(tmp) / "onnx")
        exported = load_exported_run(Path(tmp) / "onnx")
        explain_texts(exported, texts[:8])  # warm-up: onnxruntime plans its first shapes
        start = time.perf_counter()
        explain_texts(exported, texts)
        return len(texts) / (time.perf_counter() - start)


@dataclasses.dataclass
class Row:
    """One deletion order on one data set: its per-text drops (texts, K) and what else was measured."""

    name: str
    drops: np.ndarray
    texts_per_s: float | None = None
    onnx_texts_per_s: float | None = None
    spearman: float | None = None
    spearman_texts: int = 0


@dataclasses.dataclass
class Result:
    data: str
    lengths: np.ndarray  # tokens per text
    accuracy: float | None
    random: Row
    ceiling: Row  # over the first len(oracle.drops) texts, as the oracle
    oracle: Row
    methods: list[Row]
    onnx_texts: int


def bench_run(
    name: str,
    run_dir: Path,
    n: int,
    reinit_n: int,
    onnx_n: int,
    steps: int,
    oracle_n: int | None = None,
    device: str = "cpu",
) -> Result:
    run, _ = load_run(run_dir, device=device)
    texts = sample_texts(run, n)
    say(f"{name}: {len(texts)} validation texts from {run_dir} on {run.device}")
    random_run = reinitialised(run)
    explain_texts(run, texts[:8])  # warm-up (first shapes, CUDA kernels)
    methods: list[Row] = []
    encoded: list[Encoded] = []
    targets: list[int] = []
    explained: list[Explanation] = []
    for method in METHODS:
        start = time.perf_counter()
        explained = explain_texts(run, texts, method.method, steps=steps, occlusion_mode=method.mode)
        speed = len(texts) / (time.perf_counter() - start)
        encoded, targets = [ex.encoded for ex in explained], [ex.target for ex in explained]
        drops = deletion_drops(run, encoded, [ex.scores for ex in explained], targets, K)
        say(f"{name} {method.name}: {speed:.1f} texts/s, AOPC@{K} {drops.mean():.4f}; randomised model ...")
        sub = explained[:reinit_n]
        rho, counted = mean_spearman([ex.scores for ex in sub], scores_of(random_run, sub, method, steps))
        onnx = None
        if method.method == "occlusion" and method.mode == OCCLUSION_MODE:
            onnx = onnx_speed(run, texts[:onnx_n])
        methods.append(Row(method.name, drops, speed, onnx, rho, counted))
        say(f"{name} {method.name}: Spearman with the re-initialised model {rho:.3f} over {counted} texts")
    rng = np.random.default_rng(0)
    random = [
        deletion_drops(run, encoded, [rng.random(len(e.ids)) for e in encoded], targets, K) for _ in range(3)
    ]
    lengths = np.array([len(e.spans) for e in encoded])
    explained_p = [ex.probs[ex.target] for ex in explained]
    m = len(encoded) if oracle_n is None else min(oracle_n, len(encoded))
    start = time.perf_counter()
    order = oracle_scores(run, encoded[:m], targets[:m], K, EXHAUSTIVE)
    oracle = Row(
        f"oracle: best deletion order (exhaustive ≤ {EXHAUSTIVE} tokens, greedy above)",
        deletion_drops(run, encoded[:m], order, targets[:m], K),
        m / (time.perf_counter() - start),
    )
    # no deletion order lowers a probability by more than the whole of it: above the exact search, the
    # drop at every k is at most p(text), an upper bound that needs no search
    ceiling = np.array(
        [
            d if n <= EXHAUSTIVE else np.full(K, p)
            for d, n, p in zip(oracle.drops, lengths, explained_p, strict=False)
        ]
    )
    say(f"{name} oracle: AOPC@{K} {oracle.drops.mean():.4f} over {m} texts, random {np.mean(random):.4f}")
    return Result(
        name,
        lengths,
        run_accuracy(run_dir),
        Row(f"random: {K} random tokens (mean of 3 orders)", np.mean(random, axis=0)),
        Row(
            f"ceiling: the exact oracle ≤ {EXHAUSTIVE} tokens; above, all of p(text) dropped at every k",
            ceiling,
        ),
        oracle,
        methods,
        min(onnx_n, len(texts)),
    )


def run_accuracy(run_dir: Path) -> float | None:
    import json

    files = sorted(
        run_dir.glob("eval-*.json"), key=lambda f: ("-limit" in f.name, f.name)
    )  # whole split first
    return json.loads(files[0].read_text()).get("accuracy") if files else None


def aopc(drops: np.ndarray, lengths: np.ndarray, mask: np.ndarray, normalised: bool = False) -> float:
    """Mean drop over k = 1..K and the texts in `mask`; `normalised`: each text over k = 1..min(K, n - 1)
    only (texts of one token left out), so that no text is counted after it is emptied."""
    lengths, mask = lengths[: len(drops)], mask[: len(drops)]
    if not normalised:
        return float(drops[mask].mean()) if mask.any() else float("nan")
    per_text = [drops[i, : min(K, n - 1)].mean() for i, n in enumerate(lengths) if mask[i] and n >= 2]
    return float(np.mean(per_text)) if per_text else float("nan")


def above_oracle(row: Row, oracle: Row, lengths: np.ndarray) -> tuple[int, int]:
    """Texts where `row` removes more than the oracle: (exactly searched texts, greedily searched)."""
    m = len(oracle.drops)
    above = row.drops[:m].mean(1) > oracle.drops.mean(1) + 1e-5
    exact = lengths[:m] <= EXHAUSTIVE
    return int((above & exact).sum()), int((above & ~exact).sum())


def table(
    results: list[Result],
    runs: dict[str, Path],
    args: argparse.Namespace,
    seconds: float,
    load: tuple[float, ...],
) -> str:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine()
    command = (
        f"python -m bench.explain {' '.join(f'--run {k}={v}' for k, v in runs.items())} --texts {args.texts} "
        f"--reinit-texts {args.reinit_texts} --steps {args.steps}"
        + (f" --oracle-texts {args.oracle_texts}" if args.oracle_texts is not None else "")
        + (f" --device {args.device}" if args.device != "cpu" else "")
    )
    out = [
        f"Generated by `{command}`; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s); {seconds / 60:.1f} min; "
        f"load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        "(other work shared the machine when above the threads).",
        "",
        f"| data (model accuracy) | texts (mean tokens) | deletion order | texts/s | AOPC@{K} "
        f"| × random (≥ 3) | of the oracle's AOPC | drop at k = 1, 2, 5, 10 "
        f"| texts above the oracle: exact, greedy | Spearman vs re-initialised model (< 0.3) |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for res in results:
        n, m = len(res.lengths), len(res.oracle.drops)
        acc = f" ({res.accuracy:.1%})" if res.accuracy is not None else ""
        head = f"| {res.data}{acc} | {n:,} ({res.lengths.mean():.0f}) "
        for row in [res.random, res.ceiling, res.oracle, *res.methods]:
            # rows over the oracle's texts only are compared with random on those texts
            value, random = row.drops.mean(), res.random.drops[: len(row.drops)].mean()
            share = row.drops[:m].mean() / res.oracle.drops.mean()
            speed = "—" if row.texts_per_s is None else f"{row.texts_per_s:,.1f}"
            if row.onnx_texts_per_s is not None:
                speed += f"; ONNX export {row.onnx_texts_per_s:,.1f} ({res.onnx_texts} texts)"
            texts = f" (first {m:,} texts)" if len(row.drops) < n else ""
            curve = ", ".join(f"{c:.3f}" for c in row.drops.mean(0)[[0, 1, 4, 9]])
            above = "—"
            if row in res.methods or row is res.random:
                above = "{}, {}".format(*above_oracle(row, res.oracle, res.lengths))
            rho = "—"
            if row.spearman is not None:
                rho = f"{row.spearman:.3f} {'✓' if row.spearman < 0.3 else '✗'} ({row.spearman_texts} texts)"
            check = "" if row is res.random else (" ✓" if value / random >= 3 else " ✗")
            out.append(
                f"{head}| {row.name}{texts} | {speed} | {value:.4f} | {value / random:.2f}{check} "
                f"| {share:.0%} | {curve} | {above} | {rho} |"
            )
    subset = "".join(
        f"; over the first {len(r.oracle.drops):,} texts of {r.data}"
        for r in results
        if len(r.oracle.drops) < len(r.lengths)
    )
    out += [
        "",
        f"By text length in tokens, n: AOPC@{K} and its ratio to random on the same texts{subset} (ceiling "
        f"and oracle). The last row of each data set averages each text's drops over k = 1…min({K}, n − 1) "
        "only (texts of 2 or more tokens), so that no text is counted once emptied:",
        "",
        "| data | n | texts | random | ceiling | oracle | "
        + " | ".join(r.name for r in results[0].methods)
        + " |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(results[0].methods),
    ]
    for res in results:
        for label, lo, hi, normalised in [
            *((b, lo, hi, False) for b, lo, hi in BUCKETS),
            ("all", 1, 1 << 30, False),
            (f"all, k ≤ min({K}, n − 1)", 2, 1 << 30, True),
        ]:
            mask = (res.lengths >= lo) & (res.lengths <= hi)
            if not mask.any():
                continue
            cells = [f"{aopc(res.random.drops, res.lengths, mask, normalised):.4f}"]
            for row in [res.ceiling, res.oracle, *res.methods]:
                value = aopc(row.drops, res.lengths, mask, normalised)
                random = aopc(res.random.drops[: len(row.drops)], res.lengths, mask, normalised)
                cells.append(f"{value:.4f} ({value / random:.2f}×)")
            out.append(f"| {res.data} | {label} | {int(mask.sum()):,} | " + " | ".join(cells) + " |")
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
    p.add_argument(
        "--oracle-texts",
        type=int,
        default=None,
        help="of those, how many the oracle searches (default: all; it costs about 10 n forwards per text "
        f"of n > {EXHAUSTIVE} tokens)",
    )
    p.add_argument("--steps", type=int, default=32, help="integrated gradients: points on the path")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="where the models run: cpu (default), cuda")
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 on GPUs too
    runs = dict(item.split("=", 1) for item in args.run)
    started, load = time.perf_counter(), os.getloadavg()
    results = [
        bench_run(
            name,
            Path(d),
            args.texts,
            args.reinit_texts,
            args.onnx_texts,
            args.steps,
            args.oracle_texts,
            args.device,
        )
        for name, d in runs.items()
    ]
    block = table(results, {k: Path(v) for k, v in runs.items()}, args, time.perf_counter() - started, load)
    print(block)
    write_between_markers(args.output, block)
    say(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
