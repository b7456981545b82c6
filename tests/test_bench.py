"""bench/: the arithmetic of `make bench`'s tables, splicing into BENCHMARKS.md, what the predict bench
times, and the distinct text of bench.scale's large stream."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bench.bench import MARKERS, SECTION, CellResult, tables
from bench.common import markers, write_between_markers
from bench.predict_speed import PredictResult
from bench.reference import Rate, median_rate
from bench.train_speed import TrainResult

ROOT = Path(__file__).resolve().parent.parent


def rate(per_sec: float) -> Rate:
    return Rate(tokens=int(per_sec * 10), padded=int(per_sec * 10), seconds=10.0)


def test_median_rate_picks_the_middle_run() -> None:
    runs = [rate(300), rate(100), rate(200)]
    assert median_rate(runs).per_sec == 200
    assert median_rate([rate(100), rate(200)]).per_sec == 100  # the lower middle of an even count
    assert median_rate([rate(50)]).per_sec == 50


def test_table_reports_the_median_of_the_pair_ratios() -> None:
    # Three pairs whose machine sped up and slowed down: the ratio of the median rates (200 / 200 = 1.00)
    # would hide that each pair, measured back to back, said 0.50, 0.80 or 0.95.
    a_runs, d_runs = [rate(100), rate(200), rate(380)], [rate(200), rate(250), rate(400)]
    pairs = [x.per_sec / y.per_sec for x, y in zip(a_runs, d_runs, strict=True)]
    train = TrainResult("lstm", median_rate(a_runs), rate(10), rate(100), median_rate(d_runs), pairs)
    predict = [
        PredictResult(
            "run directory (torch)",
            texts=100,
            cli_seconds=2.0,
            bare_seconds=1.0,
            startup_seconds=1.5,
            engine_seconds=0.8,
        )
    ]
    (_, header, rows), (_, p_header, p_rows), _ = tables([CellResult(train, predict)], help_s=0.2)
    row = dict(zip(header, rows[0], strict=True))
    assert row["a seqtrain"] == "200" and row["d bare loop"] == "250"
    assert row["a/d (≥ 0.90)"] == "0.80 ✗"
    assert row["a/d of each pair"] == "0.50 0.80 0.95"
    assert row["a/b (≥ 15)"] == "20.0 ✓"
    p_row = dict(zip(p_header, p_rows[0], strict=True))
    assert p_row["bare forward"] == "100" and p_row["engine's forward alone"] == "125"  # 100 texts / 0.8 s
    assert p_row["ratio after start-up"] == "2.00"  # bare 1.0 s / (2.0 - 1.5) s
    # (a) has measured above (d) and ONNX's forward above the bare one: neither is called a ceiling
    assert not [h for h in header + p_header if "ceiling" in h]


def test_regenerating_keeps_the_prose_outside_the_markers(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    begin, end = markers("bench.bench")
    # no markers yet: the block goes right below the heading; the section's old text stays below it
    path.write_text(f"# Benchmarks\n\n{SECTION}\n\nold text\n\n## Next\n\nnext section\n", encoding="utf-8")
    write_between_markers(path, SECTION, MARKERS, "| table 1 |\n")
    text = path.read_text(encoding="utf-8")
    assert (
        text.index(SECTION)
        < text.index(begin)
        < text.index("| table 1 |")
        < text.index(end)
        < text.index("old text")
    )
    assert "next section" in text
    # hand-written notes above and below the block survive the next regenerate; only the block changes
    path.write_text(
        text.replace(begin, "a note by hand\n\n" + begin).replace(end, end + "\n\n| hand-run |"),
        encoding="utf-8",
    )
    write_between_markers(path, SECTION, MARKERS, "| table 2 |")
    text = path.read_text(encoding="utf-8")
    assert "| table 2 |" in text and "| table 1 |" not in text and text.count(begin) == text.count(end) == 1
    for kept in ("a note by hand", "| hand-run |", "old text", "## Next", "next section"):
        assert kept in text
    # no heading at all: a new section at the end
    other = tmp_path / "other.md"
    other.write_text("# Benchmarks\n\nintro\n", encoding="utf-8")
    write_between_markers(other, SECTION, MARKERS, "| t |")
    assert (
        other.read_text(encoding="utf-8") == f"# Benchmarks\n\nintro\n\n{SECTION}\n\n{begin}\n| t |\n{end}\n"
    )


def test_regenerating_benchmarks_md_keeps_its_hand_run_tables(tmp_path: Path) -> None:
    """The shipped BENCHMARKS.md: each generated section has its markers, and a regenerate of each
    changes nothing but what lies between them (the hand-run predict table and the notes stay)."""
    original = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(original, encoding="utf-8")
    sections = {"bench.bench": SECTION, "bench.scale": "## Memory at scale (make bench-scale)"}
    for name, heading in sections.items():
        begin, end = markers(name)
        assert original.count(begin) == original.count(end) == 1, name
        assert original.index(heading) < original.index(begin)
        write_between_markers(path, heading, name, f"| regenerated {name} |")
    text = path.read_text(encoding="utf-8")
    outside = original
    for name in sections:
        begin, end = markers(name)
        head, rest = outside.split(begin, 1)
        outside = head + begin + f"\n| regenerated {name} |\n" + end + rest.split(end, 1)[1]
    assert text == outside
    assert "**Prediction, hand-run later**" in text  # the hand-written note, outside the markers


@pytest.mark.slow
def test_torch_forward_alone_is_the_runs_own_model_not_the_bare_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench_predict's torch row times the run's model: slowed down, its figure moves, not the bare one."""
    pytest.importorskip("onnxruntime")
    from bench import predict_speed
    from bench.reference import Reference
    from seqtrain.config import from_dict, read_yaml
    from seqtrain.model import Classifier
    from tests.conftest import synthetic_rows, train_tiny_run

    run_dir = train_tiny_run(tmp_path)
    cfg = from_dict(read_yaml(run_dir / "config.yaml"))
    texts = [r["text"] for r in synthetic_rows(300, 2)]
    monkeypatch.setattr(predict_speed, "predict_wall", lambda target, lines, out: 1.0)  # no subprocesses here
    calls: list[tuple[str, int]] = []  # (which model, batch rows), in call order
    real_forward, real_bare, real_export = (
        Classifier.forward,
        Reference.forward_padded,
        predict_speed.export_run,
    )

    def slow_forward(
        self: Classifier, ids: torch.Tensor, lengths: torch.Tensor, delta: object = None
    ) -> torch.Tensor:
        calls.append(("run", ids.shape[0]))
        time.sleep(0.05)
        return real_forward(self, ids, lengths)

    def bare(self: Reference, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        calls.append(("bare", ids.shape[0]))
        return real_bare(self, ids, lengths)

    def export_then_slow_down(*args: object, **kwargs: object) -> None:
        real_export(*args, **kwargs)  # type: ignore[arg-type]
        monkeypatch.setattr(
            Classifier, "forward", slow_forward
        )  # after export, so the ONNX graph is not slowed

    monkeypatch.setattr(predict_speed, "export_run", export_then_slow_down)
    monkeypatch.setattr(Reference, "forward_padded", bare)
    torch_row, onnx_row = predict_speed.bench_predict(cfg, texts, tmp_path)
    assert torch_row.engine.endswith("(torch)") and onnx_row.engine.endswith("(onnxruntime)")
    # 300 texts: one chunk, batches of 256 and 44, after a warm-up batch; the bare model first, then the run's
    assert calls == [("bare", 256), ("bare", 256), ("bare", 44), ("run", 256), ("run", 256), ("run", 44)]
    assert torch_row.engine_seconds >= 0.05 * 2  # the two slowed calls are inside the torch row's figure
    assert torch_row.engine_seconds != torch_row.bare_seconds == onnx_row.bare_seconds
    assert onnx_row.engine_seconds != torch_row.engine_seconds


def test_scaled_stream_is_distinct_text_with_new_tokens(tmp_path: Path) -> None:
    from bench.scale import make_scaled

    def folder(name: str, texts: list[str], labelled: bool) -> Path:
        d = tmp_path / name
        d.mkdir()
        columns = {
            "text": texts,
            **({"label": [i % 2 for i in range(len(texts))], "rating": [1] * len(texts)} if labelled else {}),
        }
        pq.write_table(pa.table(columns), d / "train-00000-of-00001.parquet")
        if labelled:
            pq.write_table(pa.table(columns), d / "validation-00000-of-00001.parquet")
        return d

    words = [f"word{i:03d}" for i in range(400)]
    labelled = folder("imdb", [" ".join(words[i : i + 30]) for i in range(10)], True)
    unlabeled = folder("imdb-unlabeled", [" ".join(words[i : i + 30]) for i in range(100, 115)], False)
    stats = make_scaled(labelled, unlabeled, tmp_path / "x4", 4)
    rows = [
        r for f in sorted((tmp_path / "x4").glob("train-*.parquet")) for r in pq.read_table(f).to_pylist()
    ]
    texts = [r["text"] for r in rows]
    assert len(rows) == stats["rows"] == 40 and stats["real_rows"] == 25 and stats["variant_rows"] == 15
    assert len(set(texts)) == 40  # no row repeats another
    assert texts[:10] == [
        " ".join(words[i : i + 30]) for i in range(10)
    ]  # the labelled reviews first, as they are
    real_vocab = {w for t in texts[:25] for w in t.split()}
    new = {w for t in texts[25:] for w in t.split()} - real_vocab
    assert len(new) >= 15  # each variant brings words the real text never had
    assert {r["label"] for r in rows} == {0, 1} and set(rows[0]) == {"text", "label"}
    assert make_scaled(labelled, unlabeled, tmp_path / "x4", 4) == stats  # built once, then reused


def test_rating_ensemble_grid_and_oracle_shift() -> None:
    import numpy as np

    from bench.ratings import ensemble_grid, oracle_shift, spearman

    rng = np.random.default_rng(0)
    stars = rng.choice([1.0, 2.0, 3.0, 4.0, 7.0, 8.0, 9.0, 10.0], size=2000)
    noisy = stars + rng.normal(0, 3, size=2000)  # a regression model with its sides mixed up near 5.5
    polarity = (stars > 5.5) + rng.normal(0, 0.3, size=2000)  # a sharper, independent P(positive)
    grid = ensemble_grid(noisy, polarity, None, stars)
    assert [row[:2] for row in grid] == [(w, 0.0) for w in (0.0, 1.0, 2.0, 3.0, 4.0)]
    assert grid[0][2] == spearman(noisy, stars)  # w = 0 is the regression alone
    assert (
        max(row[2] for row in grid) > grid[0][2] + 0.02
    )  # the independent polarity adds ranking information
    assert len(ensemble_grid(noisy, None, None, stars)) == 1

    shifted = oracle_shift(noisy, stars, 5.5)
    accuracies, rhos = [row[1] for row in shifted], [row[2] for row in shifted]
    assert accuracies == sorted(accuracies) and accuracies[-1] > 0.99  # 6 stars fixes nearly every side
    assert rhos[-1] > rhos[0] + 0.05


def test_tune_bench_compares_each_pruned_study_with_the_unpruned_one_of_its_seed() -> None:
    from bench.tune import PRUNED, render

    studies = [
        (0, PRUNED, 400, 0.80),
        (1, "none", 2000, 0.85),
        (0, "none", 1000, 0.79),
        (1, PRUNED, 1400, 0.84),
    ]
    results = [
        {"seed": seed, "pruner": pruner, "steps": steps, "best": best, "best_trial": 3, "trials": 24}
        | {
            "states": {"COMPLETE": 24},
            "minutes": 1.0,
            "planned": {(0, PRUNED): 1500, (1, PRUNED): 2500}.get((seed, pruner), steps),
        }
        for seed, pruner, steps, best in studies
    ]
    block = render(results, "python -m bench.tune", "setup")
    rows = [line for line in block.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    assert [r.split(" | ")[1] for r in rows] == [PRUNED, "none", PRUNED, "none"]
    assert "60% ✓" in rows[0] and "+1.00 points ✓" in rows[0]  # against seed 0's unpruned study
    assert "30% ✗" in rows[2] and "-1.00 points ✗" in rows[2]
    assert "1,800 steps with pruning against 3,000 without (40.0% saved" in block
    assert "equal or better in 1 of 2, +0.00 points on average" in block
    assert "planned 4,000 steps, so within them pruning saved 55.0%" in block  # 1,800 trained of 4,000


def test_tune_bench_leaves_a_pair_with_failed_trials_out_of_the_totals() -> None:
    # Seed 1's unpruned study lost 10 trials to a full disk (0 steps each): counted, it would make
    # pruning look worse (or better) by the steps of trials that never ran.
    from bench.tune import PRUNED, render

    results = [
        {"seed": 0, "pruner": PRUNED, "steps": 500, "states": {"COMPLETE": 24}, "error": None},
        {"seed": 0, "pruner": "none", "steps": 1000, "states": {"COMPLETE": 24}, "error": None},
        {"seed": 1, "pruner": PRUNED, "steps": 900, "states": {"COMPLETE": 24}, "error": None},
        {"seed": 1, "pruner": "none", "steps": 700, "states": {"COMPLETE": 14, "FAIL": 10}}
        | {"error": "CheckpointError: No space left on device"},
    ]
    for r in results:
        r |= {"study": f"s{r['seed']}-{r['pruner']}", "planned": r["steps"], "best": 0.8, "best_trial": 1}
        r |= {"trials": 24, "minutes": 1.0}
    block = render(results, "python -m bench.tune", "setup")
    assert "Over the 1 pair(s): 500 steps with pruning against 1,000 without (50.0% saved" in block
    (row,) = [line for line in block.splitlines() if line.startswith(f"| 1 | {PRUNED} |")]
    assert "not compared: failed trials" in row
    assert "Left out of the totals: seed 1, s1-none has 10 failed trial(s) (CheckpointError" in block


def test_tune_bench_drops_trial_checkpoints_but_keeps_what_it_reads(tmp_path: Path) -> None:
    from bench.tune import drop_checkpoints
    from seqtrain import checkpoint

    trial = tmp_path / "trial-0000"
    for step in (50, 100):  # the real layout: last and best are links into checkpoints/
        model = torch.nn.Linear(3, 2)
        checkpoint.save(trial, step, model, None, {"step": step, "epoch": 0}, best=step == 50, keep_last=1)
    (trial / "config.yaml").write_text("model: {}\n")
    (trial / "metrics.jsonl").write_text("{}\n")
    drop_checkpoints(tmp_path)
    assert sorted(p.name for p in trial.iterdir()) == ["config.yaml", "metrics.jsonl"]


def test_tune_bench_reuses_a_study_only_once_its_first_trials_have_all_finished(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    from bench.tune import finished

    name = "bench-tune-s2-median"
    (tmp_path / name).mkdir()
    assert not finished(tmp_path, name, 3)  # no study yet: run it
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{tmp_path / name / 'study.db'}")
    for state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
        study.tell(study.ask(), 0.5 if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    running = study.ask()  # a trial a stopped run left: the study must be continued, not read as it is
    assert finished(tmp_path, name, 2) and not finished(tmp_path, name, 3)
    study.tell(running, state=optuna.trial.TrialState.FAIL)
    assert finished(tmp_path, name, 3) and not finished(tmp_path, name, 4)  # 4: one trial is missing
    assert not finished(tmp_path, "bench-tune-s2-none", 3)


def test_tune_bench_at_equal_steps_takes_the_pruned_trials_that_fit_in_the_unpruned_steps(
    tmp_path: Path,
) -> None:
    optuna = pytest.importorskip("optuna")
    from bench.tune import equal_steps_rows, within_steps

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    complete, pruned = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    # (state, value, steps): the fourth trial would pass a budget of 700 steps; its 0.9 must not count
    for state, value, steps in (
        (complete, 0.6, 300),
        (pruned, None, 100),
        (complete, 0.7, 300),
        (complete, 0.9, 50),
    ):
        trial = study.ask()
        trial.set_user_attr("steps", steps)
        study.tell(trial, value, state=state)
    assert within_steps(url, "s", 700) == {
        "trials": 3,
        "steps": 700,
        "reached": True,
        "best": 0.7,
        "best_trial": 2,
    }
    assert within_steps(url, "s", 750)["best"] == 0.9 and within_steps(url, "s", 299)["best"] is None
    # 750 steps in all: a study not continued to 1,000 steps must not be compared at "equal steps"
    assert within_steps(url, "s", 750)["reached"] and not within_steps(url, "s", 1000)["reached"]
    plain = {"seed": 3, "trials": 24, "steps": 700, "best": 0.75}
    (row,) = equal_steps_rows([(plain, {"seed": 3, **within_steps(url, "s", 700)})])
    assert row == ["3", "24 trials, 700 steps: 0.7500", "3 trials, 700 steps: 0.7000", "-5.00 points ✗"]


def test_tune_bench_replay_cuts_each_curve_where_the_rule_would_have_pruned(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    import json

    from bench.tune import replay, replay_rows

    name = "bench-tune-s0-none"
    (tmp_path / name).mkdir()
    url = f"sqlite:///{tmp_path / name / 'study.db'}"
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    large = [(50, 0.66), (100, 0.78), (150, 0.80), (158, 0.80)]  # batch 128: 158 steps, evaluated every 50
    # batch 32: 626 steps, slower per evaluation and best at the end
    small = [(s, 0.58 + 0.26 * (s / 626) ** 0.5) for s in [*range(50, 601, 50), 626]]
    bad = [(50, 0.55), (100, 0.56), (150, 0.57), (158, 0.57)]
    for number, curve in enumerate([large, large, large, small, bad]):
        run = tmp_path / name / f"trial-{number:04d}"
        run.mkdir()
        lines = [json.dumps({"split": "validation", "step": s, "accuracy": v}) for s, v in curve]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        study.add_trial(
            optuna.trial.create_trial(
                value=max(v for _, v in curve),
                user_attrs={"steps": curve[-1][0], "planned_steps": curve[-1][0]},
            )
        )
    now = replay(tmp_path, name, 5, "median")
    before = replay(tmp_path, name, 5, "median-evals")
    # Now: only the bad trial stops, at its first evaluation (after 15% of its steps).
    assert (now["pruned"], now["steps"], now["full"]) == (1, 3 * 158 + 626 + 50, 4 * 158 + 626)
    assert now["best"] == now["study_best"] == pytest.approx(0.84)
    # Before: the small batch's 4th evaluation (0.727 at step 200) set against the large batches' 4th
    # (0.80, their last) was below the median, so the best trial was pruned.
    assert (before["pruned"], before["steps"]) == (2, 3 * 158 + 200 + 50)
    assert before["best"] == pytest.approx(0.80)
    rows = replay_rows([(0, "median", now), (0, "median-evals", before)])
    assert rows[0][2:] == ["1 of 5", "1,150 of 1,258", "9%", "kept ✓"]
    assert rows[1][5] == "-4.00 points ✗"


def test_learning_curve_label_shows_only_the_overrides_that_set_a_point_apart() -> None:
    from bench.learning_curve import VECTORS_RUN, label

    # The line's own defining overrides and the ones every curve run gets are left out ...
    wide = {
        "line": "vectors+wide",
        "overrides": [
            f"model.init_from={VECTORS_RUN}",
            "model.ngrams=2",
            "train.epochs=4",
            "model.dropout=0.5",
        ],
    }
    assert label(wide) == "vectors+wide (model.dropout=0.5)"
    # ... a line without a defining override (linear is not in LINES) keeps what it was given ...
    assert label({"line": "linear", "overrides": ["model.ngrams=2"]}) == "linear (model.ngrams=2)"
    # ... and a point with nothing of its own is the bare line name.
    assert label({"line": "scratch", "overrides": ["output_dir=runs/x", "train.num_threads=1"]}) == "scratch"
