"""`seqtrain eval`: evaluate a run directory on a split (or other data), with the optional report and
pictures, and save the result beside the run without replacing the training run's own summary."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from seqtrain import console
from seqtrain.checkpoint import write_json_atomic
from seqtrain.inference.evaluation import evaluate
from seqtrain.inference.run import load_run


def evaluate_run(
    run_dir: Path,
    split: str | None,
    data: str | None,
    checkpoint: str,
    limit: int | None,
    with_report: bool,
    plots: bool,
) -> tuple[dict[str, Any], str]:
    """Evaluate, write eval-<...>.json (and the pictures); return the report and a title for it."""
    run, warnings = load_run(run_dir, checkpoint, what="`seqtrain eval`")
    for w in warnings:
        console.warn(w)
    split_name = split or run.config.data.eval_split
    data_cfg = run.config.data
    if data is not None:
        data_cfg = dataclasses.replace(data_cfg, path=data, eval_path=None, validation_split=None)
    collect = with_report or plots
    report = evaluate(
        run.model,
        run.config,
        run.tokenizer,
        run.labels,
        split_name,
        run.device,
        limit,
        data_cfg,
        collect=collect,
    )
    arrays = report.pop("arrays", None)  # numpy, not JSON: only for the report and the plots
    if with_report and arrays is not None:
        from seqtrain.explain import top_words
        from seqtrain.report import build_report

        report["report"] = build_report(arrays, report, run.tokenizer, data_cfg, split_name, limit)
        report["report"]["top_words"] = top_words(run, data_cfg, split_name, limit)
    if plots and arrays is not None:
        _eval_plots(run_dir, split_name if split_name != run.config.data.eval_split else None, report, arrays)
    inside = run.checkpoint.is_relative_to(run_dir.resolve())
    report["checkpoint"] = (
        str(run.checkpoint.relative_to(run_dir.resolve())) if inside else str(run.checkpoint)
    )
    report["data"] = data_cfg.path
    saved = run_dir / eval_file_name(split_name, data, checkpoint, limit)
    write_json_atomic(saved, report)
    console.info(f"wrote {saved}")
    return report, f"{run_dir} ({run.checkpoint.name}) on {split_name}"


def eval_file_name(split: str, data: str | None, checkpoint: str, limit: int | None) -> str:
    """eval-<split>.json is the training run's summary; an evaluation on other data, another checkpoint
    or part of the split gets its own name (eval-validation-last-limit100.json), so it never replaces it."""
    import re

    parts = [f"eval-{split}"]
    if data is not None:
        parts.append("data-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", data).strip("_.")[-60:] or "x"))
    if checkpoint != "best":
        parts.append(checkpoint)
    if limit is not None:
        parts.append(f"limit{limit}")
    return "-".join(parts) + ".json"


def _eval_plots(
    run_dir: Path, other_split: str | None, report: dict[str, Any], arrays: dict[str, Any]
) -> None:
    """The eval pictures; a split other than the config's eval split gets its name in the file names."""
    from seqtrain import console

    if report.get("task") == "regression":
        console.warn(
            "--plots draws classification pictures (confusion, precision-recall, calibration); "
            "this run is a regression."
        )
        return
    from seqtrain.plots import eval_plots

    suffix = f"-{other_split}" if other_split else ""
    for path in eval_plots(
        run_dir, arrays["outputs"], arrays["targets"], report["confusion_matrix"], report["labels"], suffix
    ):
        console.info(f"wrote {path}")
