"""bench/bench.py's arithmetic: medians of the (a)-(d) pairs and the table built from them."""

from __future__ import annotations

from bench.bench import CellResult, PredictResult, Rate, median_rate, tables


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
    result = CellResult("lstm", median_rate(a_runs), rate(10), rate(100), median_rate(d_runs), pairs,
                        [PredictResult("run directory (torch)", texts=100, cli_seconds=2.0, ceiling_seconds=1.0,
                                       startup_seconds=1.5, kernel_seconds=1.0)], None)
    (_, header, rows), _, _ = tables([result], help_s=0.2)
    row = dict(zip(header, rows[0], strict=True))
    assert row["a seqtrain"] == "200" and row["d ceiling"] == "250"
    assert row["a/d (≥ 0.90)"] == "0.80 ✗"
    assert row["a/d of each pair"] == "0.50 0.80 0.95"
    assert row["a/b (≥ 15)"] == "20.0 ✓"


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
    assert max(row[2] for row in grid) > grid[0][2] + 0.02  # the independent polarity adds ranking information
    assert len(ensemble_grid(noisy, None, None, stars)) == 1

    shifted = oracle_shift(noisy, stars, 5.5)
    accuracies, rhos = [row[1] for row in shifted], [row[2] for row in shifted]
    assert accuracies == sorted(accuracies) and accuracies[-1] > 0.99  # 6 stars fixes nearly every side
    assert rhos[-1] > rhos[0] + 0.05
