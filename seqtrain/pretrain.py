"""Language-model pretraining of the classifier's own encoder on unlabeled text.

    pretrain()           the loop: streamed, length-bucketed batches of text -> LanguageModel -> next
                         (and, bidirectional, previous) token; held-out perplexity; checkpoints; resume

`model.init_from` (what `train` and this loop start from) is seqtrain/training/init_from.py; its
functions are importable from here too.

It is `train.py`'s recipe with a different model and metric: setup -> training/loop.py's epochs and
batches with this module's `lm_step()`, its train line and `evaluate_and_save()` -> `finish()`, from the
same pieces (training/, runtime, optim, checkpoint, data.BatchStream, metrics.MetricsLog).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from seqtrain import checkpoint, console
from seqtrain.checkpoint import TrainState
from seqtrain.config import (
    PRETRAIN_IGNORES,
    Config,
    ModelConfig,
    TrainConfig,
    to_dict,
    total_steps,
)
from seqtrain.data import (
    BatchStream,
    heldout_texts,
    sorted_batches,
    text_sources,
)
from seqtrain.encoding import encode, load_tokenizer
from seqtrain.errors import ConfigError
from seqtrain.metrics import MetricsLog
from seqtrain.model import LanguageModel, count_parameters
from seqtrain.optim import lr_at, make_optimizer, optimizer_step, set_lr
from seqtrain.runtime import (
    EvaluationStopped,
    StopSignals,
    all_reduce,
    amp,
    bad_rows,
    broadcast,
    finish_distributed,
    resolve_workers,
    save_checkpoint,
    seed_everything,
)
from seqtrain.training.init_from import encoder_of as encoder_of
from seqtrain.training.init_from import init_from_pretrained as init_from_pretrained
from seqtrain.training.init_from import load_encoder as load_encoder
from seqtrain.training.init_from import pretrained_language_model as pretrained_language_model
from seqtrain.training.init_from import start_from_language_model as start_from_language_model
from seqtrain.training.loop import not_evaluated, run_loop
from seqtrain.training.run_dir import (
    finish_run,
    lock,
    open_run,
    restore,
    start_processes,
    wrap,
)
from seqtrain.training.texts import prepare_text_run

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tokenizers import Tokenizer

    from seqtrain.config import DataConfig

KIND = checkpoint.LANGUAGE_MODEL  # state.json's "kind": what init_from accepts, with vectors.VECTORS_KIND


def check_encoder_shape(model: ModelConfig) -> None:
    if model.bidirectional and model.num_layers > 1:
        raise ConfigError(
            "pretrain: model.bidirectional with model.num_layers > 1 cannot be trained as a language model: "
            "from the second layer on, each direction reads the other's states, which have seen the token to "
            "predict. Use num_layers: 1 with bidirectional: true, or bidirectional: false."
        )


def warn_ignored_train_keys(cfg: Config) -> None:
    """One line for each train key set away from its default that a language model does not use."""
    defaults = TrainConfig()
    for key in PRETRAIN_IGNORES:
        value = getattr(cfg.train, key)
        if value != getattr(defaults, key):
            console.warn(
                f"train.{key} is {value!r}, but `seqtrain pretrain` ignores it (it applies to "
                "`seqtrain train` and tune); remove it from the pretrain config."
            )


def note_adaptive_cutoffs(cfg: Config, model: LanguageModel) -> None:
    """pretrain.adaptive_cutoffs at or above the vocabulary size are left out of the softmax: say so."""
    if cfg.pretrain.softmax != "adaptive":
        return
    head = model.adaptive[0]
    assert isinstance(head, torch.nn.AdaptiveLogSoftmaxWithLoss)
    used = [int(c) for c in head.cutoffs[:-1]]
    if used != list(cfg.pretrain.adaptive_cutoffs):
        console.warn(
            f"pretrain.adaptive_cutoffs {cfg.pretrain.adaptive_cutoffs}: the vocabulary has "
            f"{model.vocab_size:,} tokens, so the softmax uses {used} (cutoffs must be below the vocabulary "
            f"size less one). Set pretrain.adaptive_cutoffs: {used}, or raise tokenizer.vocab_size."
        )


def new_stream(
    cfg: Config,
    tokenizer: Tokenizer,
    state: TrainState,
    rank: int,
    world: int,
    sources: list[tuple[DataConfig, str]],
) -> BatchStream:
    """The pretraining texts of `state.epoch`, from this rank's saved position, minus the held-out rows."""
    return BatchStream(
        cfg.data,
        cfg.data.train_split,
        tokenizer,
        None,
        cfg.train.batch_size,
        shuffle=True,
        seed=cfg.seed,
        epoch=state.epoch,
        limit=cfg.data.max_train_examples,
        resume=state.positions,
        slot_offset=state.next_slot,
        rank=rank,
        world=world,
        sources=sources,
        heldout=cfg.pretrain.heldout_fraction,
    )


def heldout_nll(
    model: LanguageModel,
    seqs: list[list[int]],
    device: torch.device,
    interrupt: Callable[[], None] | None = None,
) -> tuple[list[float], int]:
    """Exact (full-vocabulary) NLL per token on the held-out texts, per direction, and the token count.
    `interrupt()` is called after every batch; what it raises ends the evaluation (a stop signal)."""
    model.eval()
    totals = torch.zeros(model.encoder.directions, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for _, ids, lengths in sorted_batches(seqs, 64):
            sums, n = model.nll(ids.to(device), lengths.to(device), exact=True)
            totals += sums.double().cpu()
            count += n
            if interrupt is not None:
                interrupt()
    model.train()
    return (totals / max(1, count)).tolist(), count


@dataclass(kw_only=True)
class LMRun:
    """What `setup()` builds and the loop runs; only `state` changes as the run goes."""

    cfg: Config
    config_path: str
    rank: int
    world: int
    device: torch.device
    workers: int
    tokenizer: Tokenizer
    sources: list[tuple[DataConfig, str]]  # data.text_sources: what the stream reads
    run_info: dict[str, Any]
    log: MetricsLog
    model: LanguageModel  # the weights that train
    forward: torch.nn.Module  # `model`, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_amp: bool
    amp_dtype: torch.dtype
    total_steps: int
    heldout: list[list[int]]  # the encoded held-out texts (rank 0's; empty elsewhere)
    state: TrainState  # state.best: the lowest held-out NLL per token so far


@dataclass(kw_only=True)
class LMWindow:
    """Running sums over one logging window; a fresh one after every train line."""

    start: float = field(default_factory=time.perf_counter)
    tokens: float = 0.0
    loss: float = 0.0  # the sum of the steps' mean NLL per target token
    steps: float = 0.0


def save(run: LMRun, best: bool, metrics: dict[str, Any]) -> None:
    """Every rank calls this; rank 0 writes checkpoints/step-N."""
    extra = {
        "kind": KIND,
        "metrics": metrics,
        "model": to_dict(run.cfg)["model"],
        "vocab_size": run.model.vocab_size,
    }
    save_checkpoint(
        run.cfg.run_dir,
        run.state,
        run.rank,
        run.world,
        run.model,
        run.optimizer,
        extra,
        best=best,
        keep_last=run.cfg.train.keep_last,
    )


def evaluate_and_save(run: LMRun, bar: console.TrainProgress, stop: StopSignals) -> bool:
    """Held-out perplexity (rank 0), logged; every rank takes part in the checkpoint. False: a language
    model has no early stopping. A stop signal abandons the evaluation: the checkpoint is saved without it
    (training.loop.not_evaluated)."""
    state = run.state
    metrics: dict[str, Any] = {}
    improved = False
    if run.rank == 0:
        try:
            per_direction, tokens = heldout_nll(run.model, run.heldout, run.device, stop.check)
        except EvaluationStopped:  # the run ends next (training.loop.run_evaluation)
            not_evaluated(state)
            save(run, best=bool(broadcast(False, run.world)), metrics={})
            return False
        nll = sum(per_direction) / len(per_direction)
        metrics = {
            "step": state.step,
            "epoch": state.epoch,
            "split": "heldout",
            "loss": nll,
            "perplexity": math.exp(nll),
            "perplexity_forward": math.exp(per_direction[0]),
            "tokens": tokens,
        }
        if len(per_direction) == 2:
            metrics["perplexity_backward"] = math.exp(per_direction[1])
        run.log.write(metrics)
        improved = state.best is None or nll < state.best
        if improved:
            state.best, state.best_step = nll, state.step
        bar.log(
            f"step {state.step:,} epoch {state.epoch}: held-out perplexity {math.exp(nll):.1f}"
            f"{'  (best)' if improved else ''}"
        )
    save(run, best=bool(broadcast(improved, run.world)), metrics=metrics)
    return False


def pretrain(cfg: Config, resume: bool = False, config_path: str = "CONFIG") -> dict[str, Any]:
    """Train the config's encoder as a language model; return the best held-out perplexities (rank 0).
    pretrain.objective vectors: word vectors instead (seqtrain/vectors.py)."""
    if cfg.pretrain.objective == "vectors":
        from seqtrain.vectors import train_vectors

        return train_vectors(cfg, resume)
    check_encoder_shape(cfg.model)
    started = time.perf_counter()
    run = setup(cfg, resume, config_path)
    run.model.train()
    # Ctrl-C / SIGTERM / SIGHUP on any rank: finish the step, save last/, exit non-zero
    with StopSignals() as stop, console.TrainProgress(run.total_steps, run.state.step, "held-out ppl") as bar:
        batches = pretrain_loop(run, stop, bar)
    del batches  # held until the block above ended its data workers (runtime.StopSignals)
    run.forward = run.model  # the DistributedDataParallel wrapper goes before its process group
    finish_distributed(run.world)
    return finish(run, started) if run.rank == 0 else {}


def setup(cfg: Config, resume: bool, config_path: str) -> LMRun:
    """Processes and threads, the run directory (fresh or resumed), model, DDP, optimizer and AMP."""
    t, run_dir, pre = cfg.train, cfg.run_dir, cfg.pretrain
    rank, world, device = start_processes(t)
    warn_ignored_train_keys(cfg)
    lock(run_dir, rank, resume, checkpoint.LANGUAGE_MODEL)
    log = MetricsLog(run_dir / "metrics.jsonl")
    workers = resolve_workers(cfg.data.num_workers)
    tokenizer, run_info, saved = open_run(
        cfg,
        resume=resume,
        rank=rank,
        world=world,
        workers=workers,
        log=log,
        prepare=lambda: prepare_text_run(cfg, workers, world, config_path, kind=KIND),
        read=lambda: load_tokenizer(run_dir / "tokenizer.json"),
        stream=lambda tokenizer: new_stream(cfg, tokenizer, TrainState(), rank, world, text_sources(cfg)),
    )
    sources = text_sources(cfg)
    heldout = encode(tokenizer, heldout_texts(cfg), sources[0][0]) if rank == 0 else []

    seed_everything(cfg.seed)
    vocab_size = tokenizer.get_vocab_size()
    model = LanguageModel(cfg.model, vocab_size, pre.softmax, pre.num_samples, pre.adaptive_cutoffs).to(
        device
    )
    if saved is None:
        note_adaptive_cutoffs(cfg, model)
    optimizer = make_optimizer(model, t)
    total = total_steps(t, run_info["steps_per_epoch"])
    state = TrainState(world=world)
    if saved is not None:
        state = restore(saved, model, optimizer, rank)
    elif cfg.model.init_from:
        console.info(f"{start_from_language_model(cfg, model)} from {cfg.model.init_from}")
    # adaptive softmax: a batch may leave a tail cluster unused, which DDP must be told
    forward = wrap(model, device, world, find_unused_parameters=pre.softmax == "adaptive")
    use_amp, amp_dtype, scaler = amp(device, t.precision)
    console.info(
        f"language model: {cfg.model.cell.upper()} {count_parameters(model):,} parameters "
        f"({pre.softmax} softmax) on {device}, {torch.get_num_threads()} threads; "
        f"{run_info['steps_per_epoch']:,} steps per epoch, {total:,} steps"
    )
    return LMRun(
        cfg=cfg,
        config_path=config_path,
        rank=rank,
        world=world,
        device=device,
        workers=workers,
        tokenizer=tokenizer,
        sources=sources,
        run_info=run_info,
        log=log,
        model=model,
        forward=forward,
        optimizer=optimizer,
        scaler=scaler,
        use_amp=use_amp,
        amp_dtype=amp_dtype,
        total_steps=total,
        heldout=heldout,
        state=state,
    )


def lm_step(run: LMRun, batch: dict[str, Any], lr: float) -> torch.Tensor:
    """One optimizer step on one batch of texts; returns the loss, the mean NLL per target token."""
    device = run.device
    ids, lengths = batch["ids"].to(device), batch["lengths"].to(device)  # (B, T), (B,)
    set_lr(run.optimizer, lr, run.state.step)
    run.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.use_amp):
        nll_sums, targets = run.forward(ids, lengths)  # (directions,), targets per direction
        loss = nll_sums.mean() / max(1, targets)  # mean NLL per target token, averaged over directions
    run.scaler.scale(loss).backward()
    optimizer_step(run.model, run.optimizer, run.scaler, run.cfg.train.grad_clip)
    return loss


def pretrain_loop(
    run: LMRun, stop: StopSignals, bar: console.TrainProgress
) -> Iterator[dict[str, Any]] | None:
    """training.loop's run_loop with this recipe's step, train line (over a window of steps) and
    evaluation; returns the last epoch's batches, as run_loop does."""
    cfg, t, state = run.cfg, run.cfg.train, run.state
    window = LMWindow()

    def step(batch: dict[str, Any]) -> float:
        lr = lr_at(state.step, t, run.total_steps)
        loss = lm_step(run, batch, lr)
        state.advance(batch["position"], run.workers)
        window.tokens += float(batch["lengths"].sum())
        window.loss += loss.item()
        window.steps += 1
        return lr

    def log(lr: float) -> None:
        nonlocal window
        elapsed = time.perf_counter() - window.start
        tokens, loss_sum, steps = all_reduce([window.tokens, window.loss, window.steps], run.world)
        record = {
            "step": state.step,
            "epoch": state.epoch,
            "split": "train",
            "loss": loss_sum / steps,
            "lr": lr,
            "tokens_per_sec": tokens / elapsed,
            "bad_rows": bad_rows(state.positions, run.world),
        }
        if run.rank == 0:
            run.log.write(record)
        shown = math.exp(state.best) if state.best is not None else 0.0
        bar.update(
            state.step, epoch=state.epoch, loss=record["loss"], acc=shown, tps=record["tokens_per_sec"]
        )
        window = LMWindow()

    return run_loop(
        run,
        "pretrain",
        stop,
        bar,
        stream=lambda: new_stream(cfg, run.tokenizer, state, run.rank, run.world, run.sources),
        step=step,
        log=log,
        evaluate=lambda: evaluate_and_save(run, bar, stop),
        save_last=lambda: save(run, best=False, metrics={}),
    )


def finish(run: LMRun, started: float) -> dict[str, Any]:
    """Rank 0, after the loop: pretrain-summary.json, curves.png; unlock the run."""
    state, run_dir = run.state, run.cfg.run_dir
    summary = {
        "best_step": state.best_step,
        "heldout_perplexity": math.exp(state.best or 0.0),
        "train_seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }
    checkpoint.write_json_atomic(run_dir / "pretrain-summary.json", summary)

    def draw(path: Path) -> None:
        from seqtrain.plots import plot_pretrain_curves

        plot_pretrain_curves(run_dir, path)

    finish_run(
        run_dir,
        draw,
        f"best held-out perplexity {summary['heldout_perplexity']:.1f} at step {state.best_step}; "
        f"fine-tune from it with model.init_from: {run_dir}",
    )
    return summary
