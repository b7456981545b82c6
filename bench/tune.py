"""What pruning saves in `seqtrain tune`: `python -m bench.tune [--seeds 0 1] [--trials 20]`.

For each TPE seed, two studies with the same number of trials on an SST-2 training subset, from the
config `seqtrain init data/sst2` writes: one with tune's default pruner (PRUNED), one without
pruning. Same seed and same space, so their first trials (TPE's random start-up) have the same
parameters. Early stopping is off (`train.patience=null`) so the steps saved are the pruner's alone.
Reported per pair: the steps each study trained (from the study database: every trial's `steps`
attribute), the share pruning saved, and both best validation accuracies; the table goes into
BENCHMARKS.md between the `bench.tune` markers. A pair in which either study has a failed trial (a full
disk, a killed process) is shown but left out of the totals and the replays: its steps and best would
compare a study with holes in it; rerun that seed with `--fresh`.

The bench reads only each study's database and its trials' metrics.jsonl, so once a study's process
has ended its trials' checkpoints (`checkpoints/`, `last/`, `best/`, about 28 MB a trial) are deleted:
a few dozen studies would otherwise fill the disk. Each trial's config.yaml stays, to retrain it.

A study whose first --trials trials have all finished is read as it is, not run again, so a table can
cover seeds run by earlier invocations (`--seeds 0 1 2` after `--seeds 0 1` runs only seed 2's studies).
A study that exists but is not finished is continued (rerunning `seqtrain tune` tops it up to --trials),
so an interrupted bench picks up where it stopped; `--fresh` deletes the studies first. Each study is
one `seqtrain tune` process, `--parallel N` of them at once; steps, not minutes, are what is compared
(the minutes depend on the load).

`--equal-steps` also compares each pair at equal steps, the way pruning is used (the steps a trial
does not train go to more trials): the pruned study is continued, a few trials at a time, until its
trials have trained as many steps as the unpruned study's first --trials did, and its best within
those steps is set beside the unpruned study's best.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import ROOT, START_ENV, data_path, md_table, say, write_between_markers

if TYPE_CHECKING:
    import optuna

HEADING = "## Hyperparameter search: pruning"
TARGET_SAVED = 0.40
PRUNED = "top15"  # the pruner set against no pruning: tune's default
PRUNERS = (PRUNED, "none")
RULES = ("top15", "quartile", "median", "median-evals")  # replayed: tune's pruners, and the median as it was


def overrides(rows: int, epochs: int, eval_every: int) -> list[str]:
    return [
        f"data.max_train_examples={rows}",
        f"train.epochs={epochs}",
        f"train.eval_every={eval_every}",
        "train.patience=null",
        "train.num_threads=1",
    ]


def study_name(prefix: str, seed: int, pruner: str) -> str:
    return f"{prefix}-s{seed}-{pruner}"


def finished(runs: Path, name: str, first: int) -> bool:
    """Whether study `name` in runs/NAME/study.db has its first `first` trials, all finished (complete,
    pruned or failed): then a run would add nothing to what summarize reads."""
    import optuna

    db = runs / name / "study.db"
    if not db.exists():
        return False
    try:
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    except KeyError:  # the file holds no study of that name
        return False
    done = [t for t in study.get_trials(deepcopy=False) if t.number < first and t.state.is_finished()]
    return len(done) == first


def summarize(url: str, name: str, first: int) -> dict[str, Any]:
    """Trials by state, steps trained and planned, and the best value of the first `first` trials of
    one stored study: what `--trials first` gives, as trial i's parameters and pruning depend only on
    the seed and trials 0..i-1 (one process)."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=name, storage=url)
    trials = [t for t in study.get_trials(deepcopy=False) if t.number < first]
    return {
        "study": name,
        "trials": len(trials),
        "states": {
            s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)
        },
        "steps": sum(int(t.user_attrs.get("steps", 0)) for t in trials),
        "planned": sum(int(t.user_attrs.get("planned_steps", 0)) for t in trials),
        "minutes": sum(float(t.user_attrs.get("seconds", 0.0)) for t in trials) / 60,
        "error": next(
            (str(t.user_attrs.get("error", "")) for t in trials if t.state == TrialState.FAIL), None
        ),
        **best_of(study, trials),
    }


def has_failures(result: dict[str, Any]) -> bool:
    """Whether a summarized study has a failed trial: then its steps and best are not comparable."""
    return bool(result["states"].get("FAIL"))


def best_of(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> dict[str, Any]:
    """The best value among `trials`' completed ones, and its trial number (None, None if none completed)."""
    import optuna
    from optuna.trial import TrialState

    sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: sign * float(t.value)) if complete else None  # type: ignore[arg-type]
    return {
        "best": None if best is None else float(best.value),  # type: ignore[arg-type]
        "best_trial": None if best is None else best.number,
    }


def within_steps(url: str, name: str, budget: int) -> dict[str, Any]:
    """The trials of one stored study, in trial order, while their steps add up to at most `budget`:
    how many, their steps, their best value, and whether the study reached the budget (False: it was
    not continued that far, so its trials had fewer steps than the comparison is about)."""
    import optuna

    study = optuna.load_study(study_name=name, storage=url)
    taken, steps, reached = [], 0, False
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if not t.state.is_finished():
            break
        if steps + int(t.user_attrs.get("steps", 0)) > budget:
            reached = True
            break
        taken.append(t)
        steps += int(t.user_attrs.get("steps", 0))
    reached = reached or steps >= budget
    return {"trials": len(taken), "steps": steps, "reached": reached, **best_of(study, taken)}


def extend_to_steps(
    config: Path, runs: Path, name: str, seed: int, budget: int, extra: list[str], most: int
) -> None:
    """Continue the pruned study `name`, 4 trials at a time, until its finished trials have trained
    `budget` steps (or it holds `most` trials)."""
    import optuna

    url = f"sqlite:///{runs / name / 'study.db'}"
    while True:
        trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
        if sum(int(t.user_attrs.get("steps", 0)) for t in trials) >= budget or len(trials) >= most:
            return
        run_study(config, name, seed, PRUNED, len(trials) + 4, extra)


def equal_steps_rows(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[list[str]]:
    """Per seed: the unpruned study's first trials, and the pruned study's trials within their steps."""
    rows = []
    for plain, pruned in pairs:
        diff = ""
        if plain["best"] is not None and pruned["best"] is not None:
            points = (pruned["best"] - plain["best"]) * 100
            diff = f"{points:+.2f} points {'✓' if points >= 0 else '✗'}"
        rows.append(
            [
                str(plain["seed"]),
                f"{plain['trials']} trials, {plain['steps']:,} steps: {plain['best']:.4f}",
                f"{pruned['trials']} trials, {pruned['steps']:,} steps: "
                + ("none complete" if pruned["best"] is None else f"{pruned['best']:.4f}"),
                diff,
            ]
        )
    return rows


def evaluations(run_dir: Path, monitor: str = "accuracy") -> list[tuple[int, float]]:
    """(step, value) of every validation evaluation a trial's run logged, in order."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [
        (r["step"], float(r[monitor])) for r in records if r.get("split") == "validation" and monitor in r
    ]


def rule_pruner(rule: str) -> tuple[optuna.pruners.BasePruner, float, bool]:
    """A replayed rule's pruner, the share of a trial's steps from which it is asked, and whether
    reports are made at shares of training (else at evaluation numbers). "top15", "quartile", "median":
    what `seqtrain tune --pruner` does with that name (from PRUNE_AFTER). "median-evals": what median
    did before, Optuna's MedianPruner on evaluation numbers from a quarter of the steps. "pP[+pruned]/N" (the
    grid): the percentile pruner of seqtrain/tune/pruner.py at percentile P, N start-up trials, counting
    pruned trials or not, from PRUNE_AFTER."""
    import optuna

    from seqtrain.tune import PRUNE_AFTER, PRUNERS, make_pruner
    from seqtrain.tune.pruner import PercentileAtProgressPruner

    if rule in PRUNERS:  # tune's own names, one list
        return make_pruner(rule), PRUNE_AFTER, True
    if rule == "median-evals":
        return optuna.pruners.MedianPruner(n_startup_trials=3), 0.25, False
    percentile, startup = rule.removeprefix("p").split("/")
    counted = percentile.endswith("+pruned")
    pruner = PercentileAtProgressPruner(
        float(percentile.removesuffix("+pruned")), n_startup_trials=int(startup), count_pruned=counted
    )
    return pruner, PRUNE_AFTER, True


GRID = [f"p{p}{c}/{n}" for c in ("", "+pruned") for p in (50, 60, 67, 75, 80, 85, 90) for n in (3, 5)]


def grid_block(runs: Path, plains: list[dict[str, Any]], first: int) -> str:
    """Every rule of GRID replayed over every unpruned study: steps saved over all of them, in how many
    the best trial survived, the mean change of the best, and the smallest saving of one study."""
    rows = []
    for rule in GRID:
        mine = [replay(runs, p["study"], first, rule) for p in plains]
        steps, full = sum(r["steps"] for r in mine), sum(r["full"] for r in mine)
        losses = [(r["best"] - r["study_best"]) * 100 for r in mine]
        rows.append(
            [
                rule,
                f"{1 - steps / full:.1%}",
                f"{sum(x >= 0 for x in losses)} of {len(mine)}",
                f"{sum(losses) / len(losses):+.2f}",
                f"{min(1 - r['steps'] / r['full'] for r in mine):.0%}",
            ]
        )
    return (
        "Replayed rules (`--replay-grid`): `pP/N` prunes a trial whose best so far is in the bottom P% of "
        "the completed trials at the same share of training, after N completed trials, from "
        "PRUNE_AFTER of its steps; `+pruned` also counts pruned trials, held at their last best. "
        "`p50/3` is `--pruner median`, `p75+pruned/3` `--pruner quartile`, "
        "`p85+pruned/3` `--pruner top15`.\n\n"
        + md_table(["rule", "steps saved", "best kept", "best, mean change (points)", "least saved"], rows)
    )


def replay(runs: Path, name: str, first: int, rule: str) -> dict[str, Any]:
    """The first `first` trials of the unpruned study `name`, replayed in trial order under a pruning
    rule: each trial's logged learning curve is cut where the rule would have stopped it. The trials are
    the same, so what changes is the pruner's doing alone (a real pruned study also changes TPE's later
    suggestions). Rules are named as `rule_pruner` reads them. Returns the steps trained, and the best
    value of the trials left complete beside the study's best."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from seqtrain.tune.pruner import progress

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per in-memory study
    stored = optuna.load_study(study_name=name, storage=f"sqlite:///{runs / name / 'study.db'}")
    trials = sorted(
        (t for t in stored.get_trials(deepcopy=False) if t.number < first and t.state == TrialState.COMPLETE),
        key=lambda t: t.number,
    )
    pruner, after, by_share = rule_pruner(rule)
    study = optuna.create_study(direction=stored.direction)  # in memory: the replayed trials
    steps, best, pruned = 0, None, 0
    for t in trials:
        planned = int(t.user_attrs["planned_steps"])
        reported: dict[int, float] = {}
        stopped = None
        for number, (step, value) in enumerate(evaluations(runs / name / f"trial-{t.number:04d}"), 1):
            reported[progress(step, planned) if by_share else number] = value
            running = create_trial(state=TrialState.RUNNING, intermediate_values=dict(reported))
            if after * planned <= step < planned and pruner.prune(study, running):
                stopped = step
                break
        if stopped is None:
            study.add_trial(
                create_trial(state=TrialState.COMPLETE, value=t.value, intermediate_values=reported)
            )
            steps += int(t.user_attrs["steps"])
            value = float(t.value)  # type: ignore[arg-type]  # a COMPLETE trial has its value
            best = value if best is None else max(best, value)  # accuracy: larger is better
        else:
            study.add_trial(create_trial(state=TrialState.PRUNED, intermediate_values=reported))
            steps += stopped
            pruned += 1
    full = sum(int(t.user_attrs["steps"]) for t in trials)
    return {
        "trials": len(trials),
        "pruned": pruned,
        "steps": steps,
        "full": full,
        "best": best,
        "study_best": max(float(t.value) for t in trials),  # type: ignore[arg-type]
    }


def replay_rows(replays: list[tuple[int, str, dict[str, Any]]]) -> list[list[str]]:
    rows = []
    for seed, rule, r in replays:
        kept = (r["best"] - r["study_best"]) * 100
        rows.append(
            [
                str(seed),
                rule,
                f"{r['pruned']} of {r['trials']}",
                f"{r['steps']:,} of {r['full']:,}",
                f"{1 - r['steps'] / r['full']:.0%}",
                "kept ✓" if kept >= 0 else f"{kept:+.2f} points ✗",
            ]
        )
    return rows


def replay_block(runs: Path, plains: list[dict[str, Any]], first: int) -> str:
    """The replay table (see `replay`) for each unpruned study under each of RULES, and a summary per rule."""
    replays = [(p["seed"], rule, replay(runs, p["study"], first, rule)) for p in plains for rule in RULES]
    summary = []
    for rule in RULES:
        mine = [r for _, name, r in replays if name == rule]
        steps, full = sum(r["steps"] for r in mine), sum(r["full"] for r in mine)
        kept = sum(r["best"] is not None and r["best"] >= r["study_best"] for r in mine)
        summary.append(
            f"`{rule}`: {1 - steps / full:.1%} of the steps saved, best kept in {kept} of {len(mine)}"
        )
    return (
        "Replayed: each unpruned study's trials in order, each cut where the pruner would have stopped it "
        "(the same trials, so the pruner's doing alone). `top15`, `quartile` and `median` are "
        "`seqtrain tune`'s pruners of those names, at equal shares of training; `median-evals` is "
        "Optuna's MedianPruner at equal evaluation numbers from a quarter of the steps, as tune had it "
        "before.\n\n"
        + md_table(["TPE seed", "rule", "pruned", "steps", "saved", "best"], replay_rows(replays))
        + "\n\n"
        + "; ".join(summary)
        + "."
    )


def run_studies(
    config: Path, todo: list[tuple[str, int, str]], trials: int, extra: list[str], parallel: int
) -> None:
    """Each (name, seed, pruner) of `todo` as one `seqtrain tune` process, `parallel` at once: side by
    side the studies of a pair share the machine's load, so their minutes compare too."""
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        runs = [
            pool.submit(run_study, config, name, seed, pruner, trials, extra) for name, seed, pruner in todo
        ]
        try:
            for run in runs:
                run.result()  # a study that failed stops the bench with its message
        except BaseException:
            for run in runs:
                run.cancel()  # those not started yet; the running ones end on their own (or on Ctrl-C)
            raise


def run_study(config: Path, name: str, seed: int, pruner: str, trials: int, extra: list[str]) -> None:
    """One `seqtrain tune` process (1 thread)."""
    cmd = [sys.executable, "-m", "seqtrain", "tune", str(config), *extra, "--trials", str(trials)]
    cmd += ["--seed", str(seed), "--pruner", pruner, "--study", name]
    say(" ".join(cmd[2:]))
    log = ROOT / "runs" / name / "tune.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        code = subprocess.call(
            cmd, cwd=ROOT, env={**START_ENV, "OMP_NUM_THREADS": "1"}, stdout=out, stderr=out
        )
    if code != 0:
        raise SystemExit(f"bench.tune: {' '.join(cmd[2:])} exited with {code}; see {log}")
    drop_checkpoints(ROOT / "runs" / name)


def drop_checkpoints(study_dir: Path) -> None:
    """Delete the checkpoints of a finished study's trials; their config.yaml and metrics.jsonl stay."""
    from seqtrain.checkpoint import remove_all

    for trial_dir in study_dir.glob("trial-*"):
        remove_all(trial_dir)


def pair_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """One row per study, the pruned one with the saving and the comparison of the bests."""
    by = {(r["seed"], r["pruner"]): r for r in results}
    rows = []
    for seed in sorted({r["seed"] for r in results}):
        pruned, plain = by.get((seed, PRUNED)), by.get((seed, "none"))
        for r in (pruned, plain):
            if r is None:
                continue
            states = ", ".join(f"{n} {s.lower()}" for s, n in r["states"].items())
            saved = best_cmp = ""
            if r is pruned and plain is not None and (has_failures(pruned) or has_failures(plain)):
                saved = "not compared: failed trials"
            elif r is pruned and plain is not None and plain["steps"]:
                share = 1 - r["steps"] / plain["steps"]
                saved = f"{share:.0%} {'✓' if share >= TARGET_SAVED else '✗'}"
                if r["best"] is not None and plain["best"] is not None:
                    diff = (r["best"] - plain["best"]) * 100
                    best_cmp = f"{diff:+.2f} points {'✓' if diff >= 0 else '✗'}"
            best = "" if r["best"] is None else f"{r['best']:.4f} (trial {r['best_trial']})"
            rows.append(
                [
                    str(seed),
                    PRUNED if r is pruned else "none",
                    f"{r['trials']} ({states})",
                    f"{r['steps']:,}",
                    saved,
                    best,
                    best_cmp,
                    f"{r['minutes']:.1f}",
                ]
            )
    return rows


def render(results: list[dict[str, Any]], command: str, setup: str) -> str:
    header = [
        "TPE seed",
        "pruner",
        "trials",
        "steps trained",
        "saved",
        "best accuracy",
        "vs no pruning",
        "trial minutes",
    ]
    rows = pair_rows(results)
    pairs = [
        (p, n)
        for p in results
        for n in results
        if p["seed"] == n["seed"] and p["pruner"] == PRUNED and n["pruner"] == "none"
    ]
    left_out = [(p, n) for p, n in pairs if has_failures(p) or has_failures(n)]
    pairs = [pair for pair in pairs if pair not in left_out]
    steps_p, steps_n = sum(p["steps"] for p, _ in pairs), sum(n["steps"] for _, n in pairs)
    summary = ""
    if pairs and steps_n:
        ties = sum(
            p["best"] is not None and n["best"] is not None and p["best"] >= n["best"] for p, n in pairs
        )
        diffs = [
            (p["best"] - n["best"]) * 100 for p, n in pairs if p["best"] is not None and n["best"] is not None
        ]
        planned_p = sum(p["planned"] for p, _ in pairs)
        summary = (
            f"\n\nOver the {len(pairs)} pair(s): {steps_p:,} steps with pruning against {steps_n:,} without "
            f"({1 - steps_p / steps_n:.1%} saved; target {TARGET_SAVED:.0%}); pruning's best was equal or "
            f"better in {ties} of {len(pairs)}, {sum(diffs) / max(len(diffs), 1):+.2f} points on average. "
            f"The pruned studies' own trials planned {planned_p:,} steps, so within them pruning saved "
            f"{1 - steps_p / planned_p:.1%}; the rest of the difference is which trials TPE chose in each "
            "study (a batch-32 trial plans 4 times the steps of a batch-128 one)."
        )
    for p, n in left_out:
        failed = [r for r in (p, n) if has_failures(r)]
        summary += (
            f"\n\nLeft out of the totals: seed {p['seed']}, "
            + "; ".join(
                f"{r['study']} has {r['states']['FAIL']} failed trial(s) ({r['error']})" for r in failed
            )
            + ". Rerun it with `--fresh`."
        )
    return (
        f"Generated by `{command}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {setup}.\n\n"
        + md_table(header, rows)
        + summary
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--pruners", nargs="+", choices=PRUNERS, default=list(PRUNERS))
    p.add_argument("--rows", type=int, default=10000, help="SST-2 training rows (data.max_train_examples)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--prefix", default="bench-tune", help="studies are runs/PREFIX-sSEED-PRUNER")
    p.add_argument("--parallel", type=int, default=1, help="studies run at once (1 thread each)")
    p.add_argument(
        "--fresh", action="store_true", help="delete the studies first instead of continuing or reusing them"
    )
    p.add_argument(
        "--equal-steps",
        action="store_true",
        help="also continue each pruned study to the unpruned one's steps and compare the bests there",
    )
    p.add_argument(
        "--replay",
        action="store_true",
        help="also replay each unpruned study's trials under tune's pruners, and the median as it was before",
    )
    p.add_argument(
        "--replay-grid",
        action="store_true",
        help="also replay every unpruned study under a grid of percentile pruners (bench/tune.py GRID)",
    )
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="run nothing: report the first --trials trials of the studies there are (e.g. ones cut short)",
    )
    a = p.parse_args(argv)
    config = ROOT / "runs" / a.prefix / "sst2.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    data = data_path("sst2")
    if not a.render_only:
        where = str(data.relative_to(ROOT)) if data.is_relative_to(ROOT) else str(data)
        fresh = config.with_name(f"sst2-{os.getpid()}.yaml")  # then renamed: benches run side by side
        subprocess.run(
            [sys.executable, "-m", "seqtrain", "init", where, "--output", str(fresh), "--force"],
            cwd=ROOT,
            env=START_ENV,
            check=True,
            capture_output=True,
        )
        os.replace(fresh, config)
    extra = overrides(a.rows, a.epochs, a.eval_every)
    runs = ROOT / "runs"
    studies = [(study_name(a.prefix, seed, pruner), seed, pruner) for seed in a.seeds for pruner in a.pruners]
    if not a.render_only:
        if a.fresh:
            for name, _, _ in studies:
                shutil.rmtree(runs / name, ignore_errors=True)
        todo = []
        for name, seed, pruner in studies:
            if finished(runs, name, a.trials):  # e.g. run by an earlier invocation for other seeds
                say(f"{name}: its first {a.trials} trials are finished; read as they are, not run")
            else:
                todo.append((name, seed, pruner))
        run_studies(config, todo, a.trials, extra, a.parallel)
    results = []
    for name, seed, pruner in studies:
        result = {
            "seed": seed,
            "pruner": pruner,
            **summarize(f"sqlite:///{runs / name / 'study.db'}", name, a.trials),
        }
        say(json.dumps(result))
        if has_failures(result):
            say(
                f"{name}: {result['states']['FAIL']} failed trial(s), left out of the totals: "
                + str(result["error"])
            )
        results.append(result)
    comparable = [r for r in results if not has_failures(r)]
    (config.parent / "results.json").write_text(json.dumps(results, indent=1))
    command = "python -m bench.tune " + " ".join(argv if argv is not None else sys.argv[1:])
    setup = (
        f"`seqtrain init data/sst2`'s config, the default space, {a.trials} trials per study, the first "
        f"{a.rows:,} training rows, {a.epochs} epochs, `{' '.join(extra)}`, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}"
    )
    block = render(results, command.strip(), setup)
    if a.equal_steps:
        by = {(r["seed"], r["pruner"]): r for r in results}
        plains = [by[seed, "none"] for seed in a.seeds if (seed, "none") in by and (seed, PRUNED) in by]
        plains = [p for p in plains if not (has_failures(p) or has_failures(by[p["seed"], PRUNED]))]
        if not a.render_only:  # the pruned studies, --parallel at once
            with ThreadPoolExecutor(max_workers=max(1, a.parallel)) as pool:
                for extended in [
                    pool.submit(
                        extend_to_steps,
                        *(config, runs, study_name(a.prefix, p["seed"], PRUNED), p["seed"], p["steps"]),
                        *(extra, 8 * a.trials),
                    )
                    for p in plains
                ]:
                    extended.result()
        pairs = []
        for plain in plains:
            name = study_name(a.prefix, plain["seed"], PRUNED)
            within = within_steps(f"sqlite:///{runs / name / 'study.db'}", name, plain["steps"])
            pairs.append((plain, {"seed": plain["seed"], **within}))
        short = [str(n["seed"]) for n, p in pairs if not p["reached"]]  # e.g. rendered before continuing
        pairs = [(n, p) for n, p in pairs if p["reached"]]
        wins = sum(p["best"] is not None and p["best"] >= n["best"] for n, p in pairs)
        diffs = [(p["best"] - n["best"]) * 100 for n, p in pairs if p["best"] is not None]
        block += (
            "\n\nAt equal steps: each pruned study continued until its trials had trained the steps of "
            "the unpruned study's first "
            f"{a.trials} trials, and its best within them.\n\n"
            + md_table(
                ["TPE seed", "no pruning", f"{PRUNED} pruner, within those steps", "difference"],
                equal_steps_rows(pairs),
            )
            + f"\n\nAt equal steps pruning's best was equal or better in {wins} of {len(pairs)}, "
            f"{sum(diffs) / max(len(diffs), 1):+.2f} points on average."
            + (f" Not continued to equal steps, so left out: seed(s) {', '.join(short)}." if short else "")
        )
    if a.replay_grid:
        block += "\n\n" + grid_block(runs, [r for r in comparable if r["pruner"] == "none"], a.trials)
    if a.replay:
        block += "\n\n" + replay_block(runs, [r for r in comparable if r["pruner"] == "none"], a.trials)
    write_between_markers(a.output, HEADING, "bench.tune", block)
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
