"""Language-model pretraining of the classifier's own encoder on unlabeled text.

    pretrain()           the loop: streamed, length-bucketed batches of text -> LanguageModel -> next
                         (and, bidirectional, previous) token; held-out perplexity; checkpoints; resume

`model.init_from` (what `train` and this loop start from) is seqtrain/training/init_from.py; its
functions are importable from here too.

It is `train.py`'s loop with a different model and metric, built from the same pieces (runtime,
optim, checkpoint, data.BatchStream, metrics.MetricsLog, console.TrainProgress).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from seqtrain import checkpoint, console
from seqtrain.checkpoint import TrainState
from seqtrain.config import (
    PRETRAIN_IGNORES,
    Config,
    ModelConfig,
    TrainConfig,
    check_resumable,
    dump_yaml,
    to_dict,
)
from seqtrain.data import (
    BatchStream,
    build_text_vocab,
    heldout_texts,
    make_loader,
    sorted_batches,
    text_sources,
)
from seqtrain.encoding import encode, load_tokenizer
from seqtrain.errors import ConfigError, SeqtrainError
from seqtrain.metrics import MetricsLog
from seqtrain.model import LanguageModel, count_parameters
from seqtrain.optim import lr_at, make_optimizer, optimizer_step, set_lr
from seqtrain.runtime import (
    StopSignals,
    all_reduce,
    amp,
    bad_rows,
    broadcast,
    check_same_layout,
    epoch_rows,
    finish_distributed,
    init_distributed,
    interrupted,
    next_batch,
    note_dropped_rows,
    plan_ranks,
    resolve_workers,
    restore_rng,
    save_checkpoint,
    seed_everything,
    set_threads,
)
from seqtrain.training.init_from import encoder_of as encoder_of
from seqtrain.training.init_from import init_from_pretrained as init_from_pretrained
from seqtrain.training.init_from import load_encoder as load_encoder
from seqtrain.training.init_from import pretrained_language_model as pretrained_language_model
from seqtrain.training.init_from import start_from_language_model as start_from_language_model

if TYPE_CHECKING:
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


def prepare_run(
    cfg: Config, workers: int, world: int, config_path: str, kind: str = KIND
) -> tuple[Tokenizer, dict[str, Any]]:
    """A fresh run: refuse to overwrite one, read the texts once, write the run's files (run.json says
    `kind`: a language model, or vectors.VECTORS_KIND)."""
    run_dir = cfg.run_dir
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise ConfigError(
            f"{run_dir} already holds a run. Continue it with `seqtrain pretrain {config_path} --resume`, "
            "or pick another output_dir (e.g. name=... or output_dir=...), or delete the folder."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    started = time.perf_counter()
    # model.init_from: continue from that language model, with its tokenizer (ULMFiT's second stage)
    given = init_from_pretrained(cfg)[0] if cfg.model.init_from else None
    tokenizer, rows, chunk_rows, bad = build_text_vocab(cfg, given)
    steps_per_epoch = max(
        1, sum(math.ceil(n / cfg.train.batch_size) for n in chunk_rows)
    )  # torchrun: plan_ranks
    names = [f"{data.path}:{split}" for data, split in text_sources(cfg)]
    run_info = {
        **checkpoint.run_marker(),
        "kind": kind,
        "num_train_examples": rows,
        "steps_per_epoch": steps_per_epoch,
        "vocab_size": tokenizer.get_vocab_size(),
        "bad_rows": dict(bad),
        "workers": workers,
        "world": world,
        "sources": names,
        "torch": torch.__version__,
    }
    checkpoint.write_bytes_atomic(run_dir / "tokenizer.json", tokenizer.to_str().encode())
    checkpoint.write_bytes_atomic(run_dir / "config.yaml", dump_yaml(cfg).encode())
    checkpoint.write_json_atomic(run_dir / "run.json", run_info)
    console.info(
        f"vocabulary {tokenizer.get_vocab_size():,} tokens from {rows:,} texts ({', '.join(names)})"
        f"{f', skipped {dict(bad)}' if bad else ''} ({time.perf_counter() - started:.1f}s)"
    )
    return tokenizer, run_info


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


def heldout_nll(model: LanguageModel, seqs: list[list[int]], device: torch.device) -> tuple[list[float], int]:
    """Exact (full-vocabulary) NLL per token on the held-out texts, per direction, and the token count."""
    model.eval()
    totals = torch.zeros(model.encoder.directions, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for _, ids, lengths in sorted_batches(seqs, 64):
            sums, n = model.nll(ids.to(device), lengths.to(device), exact=True)
            totals += sums.double().cpu()
            count += n
    model.train()
    return (totals / max(1, count)).tolist(), count


@dataclass
class LMRun:
    """What pretrain()'s evaluations and checkpoints use; only `state` changes."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    log: MetricsLog
    model: LanguageModel
    optimizer: torch.optim.Optimizer
    heldout: list[list[int]]  # the encoded held-out texts (rank 0's; empty elsewhere)
    state: TrainState


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


def evaluate_and_save(run: LMRun, bar: console.TrainProgress) -> None:
    """Held-out perplexity (rank 0), logged; every rank takes part in the checkpoint."""
    state = run.state
    metrics: dict[str, Any] = {}
    improved = False
    if run.rank == 0:
        per_direction, tokens = heldout_nll(run.model, run.heldout, run.device)
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


def pretrain(cfg: Config, resume: bool = False, config_path: str = "CONFIG") -> dict[str, Any]:
    """Train the config's encoder as a language model; return the best held-out perplexities (rank 0).
    pretrain.objective vectors: word vectors instead (seqtrain/vectors.py)."""
    if cfg.pretrain.objective == "vectors":
        from seqtrain.vectors import train_vectors

        return train_vectors(cfg, resume)
    t, run_dir = cfg.train, cfg.run_dir
    check_encoder_shape(cfg.model)
    started = time.perf_counter()
    rank, world, device = init_distributed(t.device)
    set_threads(t.num_threads)
    if rank != 0:
        console.quiet()
    warn_ignored_train_keys(cfg)
    if t.deterministic:  # as train does
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if rank == 0:  # one process at a time in run_dir; what killed saves left behind goes
        for name in checkpoint.lock_run_dir(run_dir, fresh=not resume, kind=checkpoint.LANGUAGE_MODEL):
            console.warn(f"removed {run_dir / name}, left behind by an interrupted save")
    log = MetricsLog(run_dir / "metrics.jsonl")
    workers = resolve_workers(cfg.data.num_workers)

    # ---- the run directory (fresh) or the checkpoint to continue from (resume)
    ckpt_state: dict[str, Any] | None = None
    if resume:
        check_resumable(cfg)
        ckpt, warnings = checkpoint.find(run_dir, "last")
        for w in warnings:
            console.warn(w)
        weights, ckpt_state, opt_state, rng = checkpoint.load(ckpt, verified=True)
        tokenizer = load_tokenizer(run_dir / "tokenizer.json")
        run_info = json.loads((run_dir / "run.json").read_text())
        console.info(
            f"resuming {run_dir} from {ckpt.name} (step {ckpt_state['step']}, epoch {ckpt_state['epoch']})"
        )
        if rank == 0:
            log.truncate_after(ckpt_state["step"])
        check_same_layout(run_dir, run_info, ckpt_state, workers, world)
    elif rank != 0:
        error = broadcast(None, world, setup=True)
        if error:
            raise SeqtrainError(error)
        tokenizer = load_tokenizer(run_dir / "tokenizer.json")
        run_info = json.loads((run_dir / "run.json").read_text())
    else:
        try:
            tokenizer, run_info = prepare_run(cfg, workers, world, config_path)
        except SeqtrainError as e:
            broadcast(str(e), world, setup=True)
            raise
        broadcast(None, world, setup=True)
    sources = text_sources(cfg)
    fresh_stream = new_stream(cfg, tokenizer, TrainState(), rank, world, sources)
    if ckpt_state is None and plan_ranks(fresh_stream, world, run_info) and rank == 0:
        checkpoint.write_json_atomic(run_dir / "run.json", run_info)
    heldout = encode(tokenizer, heldout_texts(cfg), sources[0][0]) if rank == 0 else []

    # ---- model and optimizer
    seed_everything(cfg.seed)
    pre = cfg.pretrain
    vocab_size = tokenizer.get_vocab_size()
    model = LanguageModel(cfg.model, vocab_size, pre.softmax, pre.num_samples, pre.adaptive_cutoffs).to(
        device
    )
    if ckpt_state is None:
        note_adaptive_cutoffs(cfg, model)
    optimizer = make_optimizer(model, t)
    steps_per_epoch = run_info["steps_per_epoch"]
    total_steps = min(t.max_steps or 10**12, t.epochs * steps_per_epoch)
    state = TrainState(world=world)  # state.best: the lowest held-out NLL per token so far
    if ckpt_state is not None:
        model.load_state_dict(weights)
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        state = TrainState.from_checkpoint(ckpt_state, rank)
        restore_rng(ckpt_state["rng"], rng, rank)
    elif cfg.model.init_from:
        console.info(f"{start_from_language_model(cfg, model)} from {cfg.model.init_from}")
    forward: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=pre.softmax == "adaptive",  # a batch may leave a tail cluster unused
        )
    use_amp, amp_dtype, scaler = amp(device, t.precision)
    console.info(
        f"language model: {cfg.model.cell.upper()} {count_parameters(model):,} parameters "
        f"({pre.softmax} softmax) on {device}, {torch.get_num_threads()} threads; "
        f"{steps_per_epoch:,} steps per epoch, {total_steps:,} steps"
    )

    run = LMRun(cfg, rank, world, device, log, model, optimizer, heldout, state)

    # ---- the loop
    model.train()
    window = {"start": time.perf_counter(), "tokens": 0.0, "loss": 0.0, "steps": 0.0}
    with StopSignals() as stop, console.TrainProgress(total_steps, state.step, "held-out ppl") as bar:
        while state.epoch < t.epochs and state.step < total_steps:
            loader = iter(make_loader(new_stream(cfg, tokenizer, state, rank, world, sources), workers))
            epoch_done = False
            while True:
                batch, signalled = next_batch(loader, stop, world)
                if signalled:
                    save(run, best=False, metrics={})
                    raise interrupted(stop, state.step, "pretrain", config_path)
                if batch is None:
                    epoch_done = True
                    break
                if state.step >= total_steps:
                    break
                ids, lengths = batch["ids"].to(device), batch["lengths"].to(device)  # (B, T), (B,)

                lr = lr_at(state.step, t, total_steps)
                set_lr(optimizer, lr, state.step)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    nll_sums, targets = forward(ids, lengths)  # (directions,), targets per direction
                    loss = nll_sums.mean() / max(
                        1, targets
                    )  # mean NLL per target token, averaged over directions
                scaler.scale(loss).backward()
                optimizer_step(model, optimizer, scaler, t.grad_clip)
                state.advance(batch["position"], workers)
                window["tokens"] += float(batch["lengths"].sum())
                window["loss"] += loss.item()
                window["steps"] += 1
                if state.step % t.log_every == 0 or state.step == total_steps:
                    elapsed = time.perf_counter() - window["start"]
                    tokens, loss_sum, steps = all_reduce(
                        [window["tokens"], window["loss"], window["steps"]], world
                    )
                    record = {
                        "step": state.step,
                        "epoch": state.epoch,
                        "split": "train",
                        "loss": loss_sum / steps,
                        "lr": lr,
                        "tokens_per_sec": tokens / elapsed,
                        "bad_rows": bad_rows(state.positions, world),
                    }
                    if rank == 0:
                        log.write(record)
                    shown = math.exp(state.best) if state.best is not None else 0.0
                    bar.update(
                        state.step,
                        epoch=state.epoch,
                        loss=record["loss"],
                        acc=shown,
                        tps=record["tokens_per_sec"],
                    )
                    window = {"start": time.perf_counter(), "tokens": 0.0, "loss": 0.0, "steps": 0.0}
                else:
                    bar.update(state.step)
                if t.eval_every and state.step % t.eval_every == 0:
                    state.last_eval_step = state.step
                    evaluate_and_save(run, bar)
            if not epoch_done:
                break  # max_steps, inside the epoch
            if world > 1:
                note_dropped_rows(
                    run_info, state.epoch + 1, epoch_rows(state.positions, world), rank, run_dir, bar
                )
            state.next_epoch()
            if not t.eval_every and state.step != state.last_eval_step:
                state.last_eval_step = state.step
                evaluate_and_save(run, bar)
        if state.step != state.last_eval_step:
            state.last_eval_step = state.step  # saved with it: a resume does not evaluate this step again
            evaluate_and_save(run, bar)
        if broadcast(stop.signum is not None, world):  # a signal in the last evaluation: honoured too
            raise interrupted(stop, state.step, "pretrain", config_path)
    finish_distributed(world)
    if rank != 0:
        return {}
    summary = {
        "best_step": state.best_step,
        "heldout_perplexity": math.exp(state.best or 0.0),
        "train_seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }
    checkpoint.write_json_atomic(run_dir / "pretrain-summary.json", summary)
    try:
        from seqtrain.plots import plot_pretrain_curves

        plot_pretrain_curves(run_dir, run_dir / "curves.png")
    except Exception as e:  # a picture is a bonus
        console.warn(f"could not draw {run_dir / 'curves.png'}: {type(e).__name__}: {e}")
    console.info(
        f"best held-out perplexity {summary['heldout_perplexity']:.1f} at step {state.best_step}; "
        f"fine-tune from it with model.init_from: {run_dir}"
    )
    checkpoint.unlock_run_dir(run_dir)
    return summary
