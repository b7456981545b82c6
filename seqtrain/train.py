"""The classifier's training recipe: setup -> loop -> evaluate/save -> finish. `setup()` builds what
the run needs (a `ClassifierRun`), `train()` runs training/loop.py's epochs and batches with this
module's `train_step()` (one optimizer step), its train line and `evaluate_and_save()`, and `finish()`
writes the summary. No callbacks, no trainer class. `pretrain.py` is the language model's recipe,
from the same pieces (training/, runtime.py, optim.py, checkpoint.TrainState).
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from seqtrain import checkpoint, console
from seqtrain.checkpoint import TrainState
from seqtrain.config import Config, dump_yaml, monitored, to_dict, total_steps
from seqtrain.data import BatchStream, build_vocab, check_eval_split, unlabeled_source
from seqtrain.encoding import UNK_ID, Labels, read_run_files
from seqtrain.errors import ConfigError
from seqtrain.inference.evaluation import evaluate
from seqtrain.losses import task_loss, to_scores
from seqtrain.metrics import MetricsLog, is_better
from seqtrain.model import (
    Classifier,
    build_model,
    count_parameters,
    load_pretrained_embeddings,
    naive_bayes_scale,
)
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
from seqtrain.runtime import Interrupted as Interrupted  # re-exported: `seqtrain tune` catches it from here
from seqtrain.training.init_from import init_from_pretrained, load_encoder
from seqtrain.training.loop import not_evaluated, run_loop
from seqtrain.training.run_dir import (
    claim,
    finish_run,
    lock,
    open_run,
    restore,
    start_processes,
    steps_per_epoch,
    wrap,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tokenizers import Tokenizer


def example_hashes(ids: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """A short hash of each row's real token ids."""
    return [
        hashlib.blake2b(row[:n].numpy().tobytes(), digest_size=8).hexdigest()
        for row, n in zip(ids, lengths.tolist(), strict=True)
    ]


def truncate_trace(path: Path, step: int) -> None:
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if int(line.split("\t", 1)[0]) <= step]
        path.write_text("".join(line + "\n" for line in kept))


@dataclass(kw_only=True)
class ClassifierRun:
    """What `setup()` builds and the loop runs; only `state` changes as the run goes."""

    cfg: Config
    config_path: str
    rank: int
    world: int
    device: torch.device
    workers: int
    tokenizer: Tokenizer
    labels: Labels
    run_info: dict[str, Any]
    log: MetricsLog
    model: Classifier  # the weights that train
    forward: (
        torch.nn.Module
    )  # `model`, or its DistributedDataParallel wrapper (backward all-reduces the gradients)
    ema: Classifier | None  # train.ema_decay: the moving average, evaluated and saved as model.safetensors
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_amp: bool
    amp_dtype: torch.dtype
    class_weights: torch.Tensor | None
    total_steps: int
    state: TrainState
    unlabeled: Iterator[dict[str, Any]] | None = None  # train.vat_eps with pretrain.path: its batches

    @property
    def regression(self) -> bool:
        return self.labels.task == "regression"

    @property
    def monitor(self) -> str:
        return monitored(self.cfg.train, self.regression)

    @property
    def inference_model(self) -> Classifier:
        return self.ema if self.ema is not None else self.model


@dataclass(kw_only=True)
class TrainWindow:
    """Running sums over one logging window; a fresh one after every train line."""

    t0: float = field(default_factory=time.perf_counter)
    tokens: float = 0
    padded: float = 0
    wait: float = 0.0
    loss: float = 0.0
    correct: float = 0  # regression: the sum of absolute errors, in the target's units
    n: float = 0
    unk: float = 0

    def add(
        self,
        batch: dict[str, Any],
        loss: torch.Tensor,
        logits: torch.Tensor,
        y: torch.Tensor,
        run: ClassifierRun,
    ) -> None:
        self.tokens += int(batch["lengths"].sum())
        self.padded += batch["ids"].numel()
        self.unk += int((batch["ids"] == UNK_ID).sum())
        self.loss += loss.item() * len(y)
        if run.regression:
            self.correct += float((to_scores(logits.detach(), run.labels, run.cfg) - y).abs().sum())
        else:
            self.correct += int((logits.argmax(-1) == y).sum())
        self.n += len(y)

    def record(self, run: ClassifierRun, lr: float) -> dict[str, Any]:
        """The train line, for all ranks (every rank calls this: the sums are taken over ranks)."""
        elapsed = time.perf_counter() - self.t0
        if run.world > 1:
            keys = ("tokens", "padded", "loss", "correct", "n", "unk")
            for key, value in zip(keys, all_reduce([getattr(self, k) for k in keys], run.world), strict=True):
                setattr(self, key, value)
        return {
            "step": run.state.step,
            "epoch": run.state.epoch,
            "split": "train",
            "loss": self.loss / self.n,
            ("mae" if run.regression else "accuracy"): self.correct / self.n,
            "lr": lr,
            "tokens_per_sec": self.tokens / elapsed,
            "padding": 1 - self.tokens / self.padded,
            "data_wait": self.wait / elapsed,
            "unk_rate": self.unk / max(1, self.tokens),
            "bad_rows": bad_rows(run.state.positions, run.world),
        }


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * model, with d warming up as (1 + step) / (10 + step): early on the
    average follows the weights closely instead of remembering their random start."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - d)
        for average, current in zip(ema.buffers(), model.buffers(), strict=True):
            average.copy_(current)  # model.head_norm's running statistics: the current ones, not the start's


def embedding_probe(ids: torch.Tensor, dim: int) -> torch.Tensor:
    """A zero (B, T, E) tensor added to the embeddings; after backward its .grad is d loss / d embeddings."""
    return torch.zeros(*ids.shape, dim, device=ids.device, requires_grad=True)


def adversarial_perturbation(grad: torch.Tensor, eps: float) -> torch.Tensor:
    """grad (B, T, E) -> eps * grad / ||grad||, the norm taken per text over all its steps (Miyato et al.
    2017). Dividing by the max first keeps the squares from underflowing; padding's gradient is 0."""
    g = grad.detach()
    g = g / (g.abs().amax(dim=(1, 2), keepdim=True) + 1e-12)
    return eps * g / torch.sqrt((g * g).sum(dim=(1, 2), keepdim=True) + 1e-6)


def kl_from(clean: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per text, averaged: clean (B, C) log p, held fixed; logits (B, C) of q."""
    return torch.nn.functional.kl_div(logits.log_softmax(-1), clean, log_target=True, reduction="batchmean")


def virtual_adversarial_loss(
    model: Classifier, forward: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor, eps: float
) -> torch.Tensor:
    """train.vat_eps (Miyato et al., 2017): KL(p(x) || p(x + r)) for texts without labels, r the
    eps-long move of the embeddings (B, T, E) that changes the prediction most, found by one power
    iteration from a random direction. `forward` is `model` or its DDP wrapper, for the one pass whose
    gradient reaches the weights. Every pass draws the same dropout masks."""
    rng_device, rng_devices = ("cuda", []) if ids.device.type == "cpu" else (ids.device.type, [ids.device])
    real = (torch.arange(ids.shape[1], device=ids.device) < lengths.unsqueeze(1)).unsqueeze(-1)  # (B, T, 1)
    # The random start, 0 on the padding, 0.1 long per text: Miyato et al.'s finite-difference step.
    d = torch.randn(*ids.shape, model.embedding.embedding_dim, device=ids.device) * real
    d = adversarial_perturbation(d, 0.1).requires_grad_()  # (B, T, E)
    with torch.random.fork_rng(rng_devices, device_type=rng_device), torch.no_grad():
        clean = model(ids, lengths).float().log_softmax(-1)  # (B, C)
    with torch.random.fork_rng(rng_devices, device_type=rng_device):
        # the bare model, not DDP's wrapper: this backward reaches only d, nothing to all-reduce
        (grad,) = torch.autograd.grad(kl_from(clean, model(ids, lengths, d).float()), d)
    return kl_from(clean, forward(ids, lengths, adversarial_perturbation(grad, eps)).float())


def unlabeled_batches(
    cfg: Config, tokenizer: Tokenizer, state: TrainState, rank: int, world: int
) -> Iterator[dict[str, Any]]:
    """train.vat_eps: endless shuffled batches of pretrain.path's texts, cut as data.max_length cuts the
    labelled ones, read in this process; state.unlabeled_epoch/position say where a resume continues."""
    pre, source = cfg.pretrain, unlabeled_source(cfg)
    while True:
        stream = BatchStream(
            source,
            pre.split,
            tokenizer,
            None,
            cfg.train.batch_size,
            shuffle=True,
            seed=cfg.seed + 1,  # not the labelled stream's order
            epoch=state.unlabeled_epoch,
            resume=state.unlabeled_position,
            rank=rank,
            world=world,
        )
        empty = True
        for batch in stream:
            empty = False
            state.unlabeled_position = {str(batch["position"]["slot"]): batch["position"]}
            yield batch
        if empty and not state.unlabeled_position:
            raise ConfigError(f"pretrain.path {pre.path} ({pre.split} split) has no texts for train.vat_eps.")
        state.unlabeled_epoch, state.unlabeled_position = state.unlabeled_epoch + 1, {}


def prepare_run(
    cfg: Config, workers: int, world: int, config_path: str
) -> tuple[tuple[Tokenizer, Labels], dict[str, Any]]:
    """A fresh run: refuse to overwrite one, stream the training split once, write the run's files."""
    run_dir = cfg.run_dir
    claim(run_dir, "train", config_path)
    t0 = time.perf_counter()
    vocab = build_vocab(cfg, init_from_pretrained(cfg)[0] if cfg.model.init_from else None)
    tokenizer, labels = vocab.tokenizer, vocab.labels
    eval_warning = check_eval_split(cfg, labels)  # a missing split or unknown labels: now, not after an epoch
    run_info = {
        **checkpoint.run_marker(),
        "num_train_examples": vocab.num_examples,
        "steps_per_epoch": steps_per_epoch(vocab.chunk_rows, cfg.train.batch_size),
        "vocab_size": tokenizer.get_vocab_size(),
        "labels": labels.names,
        "bad_rows": dict(vocab.bad_rows),
        "workers": workers,
        "world": world,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    checkpoint.write_bytes_atomic(run_dir / "tokenizer.json", tokenizer.to_str().encode())
    checkpoint.write_json_atomic(run_dir / "labels.json", labels.to_json())
    checkpoint.write_bytes_atomic(run_dir / "config.yaml", dump_yaml(cfg).encode())
    checkpoint.write_json_atomic(run_dir / "run.json", run_info)
    console.info(
        f"vocabulary {tokenizer.get_vocab_size():,} tokens, labels {labels.names}, "
        f"{vocab.num_examples:,} training rows"
        f"{f', skipped {dict(vocab.bad_rows)}' if vocab.bad_rows else ''} ({time.perf_counter() - t0:.1f}s)"
    )
    if eval_warning:
        console.warn(eval_warning)
    return (tokenizer, labels), run_info


def train_stream(
    cfg: Config, tokenizer: Tokenizer, labels: Labels, state: TrainState, rank: int, world: int
) -> BatchStream:
    """The training split for `state.epoch`, from this rank's saved position."""
    return BatchStream(
        cfg.data,
        cfg.data.train_split,
        tokenizer,
        labels,
        cfg.train.batch_size,
        shuffle=True,
        seed=cfg.seed,
        epoch=state.epoch,
        limit=cfg.data.max_train_examples,
        resume=state.positions,
        slot_offset=state.next_slot,
        rank=rank,
        world=world,
    )


def setup(cfg: Config, resume: bool, config_path: str) -> ClassifierRun:
    """Processes and threads, the run directory (fresh or resumed), model, EMA, DDP, optimizer and AMP."""
    t, run_dir = cfg.train, cfg.run_dir
    rank, world, device = start_processes(t)
    lock(run_dir, rank, resume, checkpoint.CLASSIFIER)
    log = MetricsLog(
        run_dir / "metrics.jsonl", run_dir / "tensorboard" if t.tensorboard and rank == 0 else None
    )
    workers = resolve_workers(cfg.data.num_workers)
    (tokenizer, labels), run_info, saved = open_run(
        cfg,
        resume=resume,
        rank=rank,
        world=world,
        workers=workers,
        log=log,
        prepare=lambda: prepare_run(cfg, workers, world, config_path),
        read=lambda: read_run_files(run_dir),
        stream=lambda files: train_stream(cfg, *files, TrainState(), rank, world),
        truncate=lambda step: truncate_trace(run_dir / "trained-examples.tsv", step),
    )

    seed_everything(cfg.seed)  # the same config and seed give the same weights
    model = build_model(cfg.model, tokenizer.get_vocab_size(), labels.outputs, data=cfg.data).to(device)
    class_weights = None
    if t.class_weights == "balanced" and labels.task != "regression":
        counts = torch.tensor(labels.counts, dtype=torch.float32).clamp(min=1)
        class_weights = (counts.sum() / (len(counts) * counts)).to(device)  # n / (C * count_c)
    optimizer = make_optimizer(model, t)
    total = total_steps(t, run_info["steps_per_epoch"])
    if t.warmup_steps > total:
        console.warn(
            f"train.warmup_steps {t.warmup_steps} is longer than the run ({total} steps): "
            f"the learning rate stops at {lr_at(total - 1, t, total):.3g}, "
            f"never reaching train.lr {t.lr:g}."
        )
    state, ema_weights = TrainState(world=world), None
    if saved is not None:
        weights = saved.weights
        if t.ema_decay:  # model.safetensors holds the average; training continues from the raw weights
            ema_weights, weights = weights, checkpoint.load_tensors(saved.path / "train-model.safetensors")
        state = restore(saved, model, optimizer, rank, weights)
    else:
        start_from_pretrained(cfg, model, tokenizer, run_info, rank)
        if model.ngram_scale is not None:
            count_ngram_ratios(cfg, model, tokenizer, labels)
    if cfg.model.freeze_embeddings:
        model.embedding.weight.requires_grad_(False)
    ema = copy.deepcopy(model).requires_grad_(False) if t.ema_decay else None
    if ema is not None and ema_weights is not None:
        ema.load_state_dict(ema_weights)
    forward = wrap(model, device, world)
    use_amp, amp_dtype, scaler = amp(device, t.precision)
    unlabeled = (
        unlabeled_batches(cfg, tokenizer, state, rank, world) if t.vat_eps and cfg.pretrain.path else None
    )
    console.info(
        f"model: {cfg.model.cell.upper()} {count_parameters(model):,} parameters on {device}, "
        f"{torch.get_num_threads()} threads, {workers} data workers; "
        f"{run_info['steps_per_epoch']:,} steps per epoch, {total:,} steps"
    )
    return ClassifierRun(
        cfg=cfg,
        config_path=config_path,
        rank=rank,
        world=world,
        device=device,
        workers=workers,
        tokenizer=tokenizer,
        labels=labels,
        run_info=run_info,
        log=log,
        model=model,
        forward=forward,
        ema=ema,
        optimizer=optimizer,
        scaler=scaler,
        use_amp=use_amp,
        amp_dtype=amp_dtype,
        class_weights=class_weights,
        total_steps=total,
        state=state,
        unlabeled=unlabeled,
    )


def start_from_pretrained(
    cfg: Config, model: Classifier, tokenizer: Tokenizer, run_info: dict[str, Any], rank: int
) -> None:
    """A fresh run's model.pretrained_embeddings (word vectors) and model.init_from (a pretrained encoder)."""
    if cfg.model.pretrained_embeddings:
        found, size = load_pretrained_embeddings(
            model, cfg.model.pretrained_embeddings, tokenizer.get_vocab(), cfg.tokenizer.lowercase
        )
        console.info(
            f"pretrained embeddings: {found:,} of {size:,} vocabulary words found "
            f"({found / size:.1%} coverage)"
        )
        run_info["embedding_coverage"] = found / size
        if rank == 0:
            checkpoint.write_json_atomic(cfg.run_dir / "run.json", run_info)
    if cfg.model.init_from:
        _, encoder = init_from_pretrained(cfg)
        load_encoder(model, encoder, cfg.model.init_from)
        what = "encoder (embeddings and recurrent layers)"
        if not any(name.startswith("layers.") for name in encoder):
            what = "word vectors (the embeddings; the recurrent layers start fresh)"
        console.info(f"{what} from {cfg.model.init_from}; the head starts fresh")


def count_ngram_ratios(cfg: Config, model: Classifier, tokenizer: Tokenizer, labels: Labels) -> None:
    """model.ngram_weighting nb, fresh runs: one pass over the whole training split, as the model reads it
    (every rank counts it all, so the ratios agree without a collective); resumed runs load them."""
    t0 = time.perf_counter()
    stream = BatchStream(
        cfg.data,
        cfg.data.train_split,
        tokenizer,
        labels,
        256,
        shuffle=False,
        limit=cfg.data.max_train_examples,
    )
    assert model.ngram_scale is not None
    scale, texts = naive_bayes_scale(stream, cfg.model, tokenizer.get_vocab_size(), labels.outputs)
    model.ngram_scale.copy_(scale)
    console.info(
        f"n-gram path: naive Bayes ratios from {texts:,} training texts ({time.perf_counter() - t0:.1f}s)"
    )


def ngram_path_loss(run: ClassifierRun, y: torch.Tensor) -> torch.Tensor:
    """model.ngrams: the n-gram path's own loss on the batch the last forward pass saw (0 without it);
    adding it to the recurrent path's loss trains both at once, neither through the other."""
    wide, run.model.wide_output = run.model.wide_output, None
    if wide is None:
        return torch.zeros((), device=y.device)
    return task_loss(wide, y, run.labels, run.cfg, class_weights=run.class_weights)


def train_step(
    run: ClassifierRun, batch: dict[str, Any], lr: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on one batch; returns (loss, logits, targets) for the log."""
    cfg, t, device = run.cfg, run.cfg.train, run.device
    ids, lengths, y = batch["ids"].to(device), batch["lengths"].to(device), batch["labels"].to(device)
    set_lr(run.optimizer, lr, run.state.step)
    run.optimizer.zero_grad(set_to_none=True)
    # train.adversarial_eps: a zero perturbation of the embeddings, whose gradient says which way raises
    # the loss; the RNG is forked around the clean pass (the CPU generator always, plus this accelerator's)
    # so that both passes draw the same dropout masks.
    delta = embedding_probe(ids, cfg.model.embedding_dim) if t.adversarial_eps else None
    rng_device, rng_devices = ("cuda", []) if device.type == "cpu" else (device.type, [device])
    with (
        torch.random.fork_rng(rng_devices, enabled=delta is not None, device_type=rng_device),
        torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.use_amp),
    ):
        logits = run.forward(ids, lengths, delta)  # (B, C); under DDP, backward all-reduces the gradients
        loss = task_loss(logits, y, run.labels, cfg, class_weights=run.class_weights)
        wide_loss = ngram_path_loss(run, y)
    run.scaler.scale(loss + wide_loss).backward()
    if delta is not None and delta.grad is not None:
        r_adv = adversarial_perturbation(delta.grad, t.adversarial_eps)  # (B, T, E)
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.use_amp):
            adv_loss = task_loss(
                run.forward(ids, lengths, r_adv), y, run.labels, cfg, class_weights=run.class_weights
            )
            adv_loss = adv_loss + 0.0 * ngram_path_loss(run, y)  # the n-gram path ignores embeddings
        run.scaler.scale(adv_loss).backward()  # gradients add up: clean loss + adversarial loss
    if t.vat_eps:
        if run.unlabeled is not None:
            unlabeled = next(run.unlabeled)
            ids, lengths = unlabeled["ids"].to(device), unlabeled["lengths"].to(device)
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.use_amp):
            vat_loss = virtual_adversarial_loss(run.model, run.forward, ids, lengths, t.vat_eps)
            run.model.wide_output = None  # the n-gram path takes no part in the consistency loss
        run.scaler.scale(vat_loss).backward()
    optimizer_step(run.model, run.optimizer, run.scaler, t.grad_clip)
    if run.ema is not None and t.ema_decay:
        ema_update(run.ema, run.model, t.ema_decay, run.state.step)
    return loss, logits, y


def save(run: ClassifierRun, reports: dict[int, dict[str, Any]], best: bool) -> None:
    """Every rank calls this; rank 0 writes checkpoints/step-N with this step's evaluation, if any."""
    metrics = {k: v for k, v in reports.get(run.state.step, {}).items() if k != "arrays"}
    extra = {
        "metrics": metrics,
        "model": to_dict(run.cfg)["model"],
        "vocab_size": run.tokenizer.get_vocab_size(),
        "labels": run.labels.names,
    }
    save_checkpoint(
        run.cfg.run_dir,
        run.state,
        run.rank,
        run.world,
        run.inference_model,
        run.optimizer,
        extra,
        best=best,
        keep_last=run.cfg.train.keep_last,
        train_model=run.model if run.ema is not None else None,
    )


def evaluate_and_save(
    run: ClassifierRun,
    reports: dict[int, dict[str, Any]],
    bar: console.TrainProgress,
    should_stop: Callable[[int, dict[str, Any]], bool] | None,
    stop: StopSignals,
) -> bool:
    """Rank 0 evaluates and logs, every rank takes part in the checkpoint; True when the run should stop
    (early stopping, or `should_stop(step, report)`: a caller's verdict, `seqtrain tune`'s pruner). A stop
    signal abandons the evaluation: the checkpoint is saved without it (training.loop.not_evaluated)."""
    cfg, t, state = run.cfg, run.cfg.train, run.state
    if run.rank != 0:
        save(run, reports, best=False)
        return bool(broadcast(None, run.world))
    try:
        report = evaluate(
            run.inference_model,
            cfg,
            run.tokenizer,
            run.labels,
            cfg.data.eval_split,
            run.device,
            cfg.data.max_eval_examples,
            interrupt=stop.check,
        )
    except EvaluationStopped:  # the run ends next (training.loop.run_evaluation)
        not_evaluated(state)
        save(run, reports, best=False)
        return bool(broadcast(False, run.world))
    reports[state.step] = report
    keys = (
        ("mae", "rmse", "r2", "spearman", "accuracy_rounded")
        if run.regression
        else ("accuracy", "f1_macro", "top_k_accuracy")
    )
    run.log.write(
        {
            "step": state.step,
            "epoch": state.epoch,
            "split": cfg.data.eval_split,
            "loss": report["loss"],
            **{k: report[k] for k in keys if k in report},
        }
    )
    value = report[run.monitor]
    improved = is_better(run.monitor, value, state.best)
    if improved:
        state.best, state.best_step, state.bad_evals = value, state.step, 0
    else:
        state.bad_evals += 1
    save(run, reports, best=improved)
    shown = " ".join(f"{k} {report[k]:.4f}" for k in keys[:4] if k in report)
    bar.log(
        f"step {state.step:,} epoch {state.epoch}: {cfg.data.eval_split} loss {report['loss']:.4f} {shown}"
        f"{'  (best)' if improved else ''}"
    )
    stop_now = should_stop is not None and should_stop(state.step, report)
    return bool(broadcast((t.patience is not None and state.bad_evals >= t.patience) or stop_now, run.world))


def train(
    cfg: Config,
    resume: bool = False,
    config_path: str = "CONFIG",
    should_stop: Callable[[int, dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """Train as `cfg` says; return the best evaluation report (on rank 0; {} on the other ranks)."""
    started = time.perf_counter()
    run = setup(cfg, resume, config_path)
    reports: dict[int, dict[str, Any]] = {}  # step -> evaluation, this process's
    run.model.train()
    # Ctrl-C / SIGTERM / SIGHUP on any rank: finish the step, save last/, exit non-zero
    with (
        StopSignals() as stop,
        console.TrainProgress(run.total_steps, run.state.step, "mae" if run.regression else "acc") as bar,
    ):
        batches = train_loop(run, reports, stop, bar, should_stop)
    del batches  # held until the block above ended its data workers (runtime.StopSignals)
    run.forward = run.model  # the DistributedDataParallel wrapper goes before its process group
    finish_distributed(run.world)
    return finish(run, reports, started) if run.rank == 0 else {}


def train_loop(
    run: ClassifierRun,
    reports: dict[int, dict[str, Any]],
    stop: StopSignals,
    bar: console.TrainProgress,
    should_stop: Callable[[int, dict[str, Any]], bool] | None,
) -> Iterator[dict[str, Any]] | None:
    """training.loop's run_loop with this recipe's step, train line (over a window of steps) and
    evaluation; returns the last epoch's batches, as run_loop does."""
    cfg, t, state = run.cfg, run.cfg.train, run.state
    window = TrainWindow()

    def step(batch: dict[str, Any]) -> float:
        lr = lr_at(state.step, t, run.total_steps)
        loss, logits, y = train_step(run, batch, lr)
        state.advance(batch["position"], run.workers)
        window.add(batch, loss, logits, y, run)
        if t.trace_examples and run.rank == 0:
            with open(cfg.run_dir / "trained-examples.tsv", "a") as trace:
                trace.writelines(
                    f"{state.step}\t{h}\n" for h in example_hashes(batch["ids"], batch["lengths"])
                )
        return lr

    def log(lr: float) -> None:
        nonlocal window
        record = window.record(run, lr)
        if run.rank == 0:
            run.log.write(record)
        bar.update(
            state.step,
            epoch=state.epoch,
            loss=record["loss"],
            acc=window.correct / window.n,
            tps=record["tokens_per_sec"],
        )
        window = TrainWindow()

    def waited(seconds: float) -> None:
        window.wait += seconds

    return run_loop(
        run,
        "train",
        stop,
        bar,
        stream=lambda: train_stream(cfg, run.tokenizer, run.labels, state, run.rank, run.world),
        step=step,
        log=log,
        evaluate=lambda: evaluate_and_save(run, reports, bar, should_stop, stop),
        save_last=lambda: save(run, reports, best=False),
        waited=waited,
    )


def finish(run: ClassifierRun, reports: dict[int, dict[str, Any]], started: float) -> dict[str, Any]:
    """Rank 0, after the loop: the best checkpoint's report as eval-<split>.json, curves.png; unlock the
    run."""
    cfg, state, run_dir = run.cfg, run.state, run.cfg.run_dir
    best = reports.get(state.best_step) if state.best_step is not None else None
    if best is None:  # best was found before a resume: read it from its checkpoint
        best_dir = (run_dir / "best").resolve()
        best = json.loads((best_dir / "state.json").read_text()).get("metrics") or {}
    if best:
        checkpoint.write_json_atomic(
            run_dir / f"eval-{cfg.data.eval_split}.json",
            {
                **best,
                "checkpoint": f"best ({state.best_step})",
                "train_seconds": time.perf_counter() - started,
                "threads": torch.get_num_threads(),
            },
        )
        console.print_eval(
            best, f"{cfg.name}: best checkpoint (step {state.best_step}) on {cfg.data.eval_split}"
        )

    def draw(path: Path) -> None:
        from seqtrain.plots import plot_run_curves

        plot_run_curves([run_dir], path)

    finish_run(
        run_dir, draw, f"run directory: {run_dir}  (best: {run_dir / 'best'}, last: {run_dir / 'last'})"
    )
    return best
