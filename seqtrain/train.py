"""The training loop. Read it top to bottom: setup, one loop over epochs and batches, evaluation
and checkpoints inside it, and a final summary. No callbacks, no trainer class.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from seqtrain import checkpoint, console
from seqtrain.config import Config, check_resumable, dump_yaml, to_dict
from seqtrain.data import BatchStream, build_vocab, check_eval_split, make_loader
from seqtrain.encoding import UNK_ID, Labels, read_run_files
from seqtrain.errors import ConfigError, SeqtrainError
from seqtrain.inference import evaluate, task_loss, to_scores
from seqtrain.metrics import MetricsLog, is_better
from seqtrain.model import build_model, count_parameters, load_pretrained_embeddings
from seqtrain.optim import lr_at, make_optimizer
from seqtrain.pretrain import init_from_pretrained, load_encoder
from seqtrain.runtime import (
    Interrupted,
    StopSignals,
    all_gather,
    all_reduce,
    all_rng_states,
    bad_rows,
    broadcast,
    epoch_rows,
    finish_distributed,
    init_distributed,
    note_dropped_rows,
    plan_ranks,
    resolve_workers,
    restore_rng,
    seed_everything,
    set_threads,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from tokenizers import Tokenizer



def example_hashes(ids: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """A short hash of each row's real token ids."""
    return [hashlib.blake2b(row[:n].numpy().tobytes(), digest_size=8).hexdigest() for row, n in zip(ids, lengths.tolist(), strict=True)]


def truncate_trace(path: Path, step: int) -> None:
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if int(line.split("\t", 1)[0]) <= step]
        path.write_text("".join(line + "\n" for line in kept))


def new_window() -> dict[str, float]:
    """Running sums for one logging window (reset after every train line)."""
    return {"t0": time.perf_counter(), "tokens": 0, "padded": 0, "wait": 0.0, "loss": 0.0, "correct": 0, "n": 0, "unk": 0}


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * model, with d warming up as (1 + step) / (10 + step): early on the
    average follows the weights closely instead of remembering their random start."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - d)


def embedding_probe(ids: torch.Tensor, dim: int) -> torch.Tensor:
    """A zero (B, T, E) tensor added to the embeddings; after backward its .grad is d loss / d embeddings."""
    return torch.zeros(*ids.shape, dim, device=ids.device, requires_grad=True)


def adversarial_perturbation(grad: torch.Tensor, eps: float) -> torch.Tensor:
    """grad (B, T, E) -> eps * grad / ||grad||, the norm taken per text over all its steps (Miyato et al.
    2017). Dividing by the max first keeps the squares from underflowing; padding's gradient is 0."""
    g = grad.detach()
    g = g / (g.abs().amax(dim=(1, 2), keepdim=True) + 1e-12)
    return eps * g / torch.sqrt((g * g).sum(dim=(1, 2), keepdim=True) + 1e-6)


def prepare_run(cfg: Config, workers: int, world: int, config_path: str) -> tuple[Tokenizer, Labels, dict[str, Any]]:
    """A fresh run: refuse to overwrite one, stream the training split once, write the run's files."""
    t, run_dir = cfg.train, cfg.run_dir
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise ConfigError(
            f"{run_dir} already holds a run. Continue it with `seqtrain train {config_path} --resume`, or pick "
            f"another output_dir (e.g. name=... or output_dir=...), or delete the folder."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    t0 = time.perf_counter()
    vocab = build_vocab(cfg, init_from_pretrained(cfg)[0] if cfg.model.init_from else None)
    tokenizer, labels = vocab.tokenizer, vocab.labels
    eval_warning = check_eval_split(cfg, labels)  # a missing split or unknown labels: now, not after an epoch
    # Under DDP each rank counts its own part after this (runtime.plan_ranks) and the epoch is the smallest.
    steps_per_epoch = max(1, sum(math.ceil(n / t.batch_size) for n in vocab.chunk_rows))
    run_info = {
        "num_train_examples": vocab.num_examples, "steps_per_epoch": steps_per_epoch,
        "vocab_size": tokenizer.get_vocab_size(), "labels": labels.names, "bad_rows": dict(vocab.bad_rows),
        "workers": workers, "world": world,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
    }
    checkpoint.write_bytes_atomic(run_dir / "tokenizer.json", tokenizer.to_str().encode())
    checkpoint.write_json_atomic(run_dir / "labels.json", labels.to_json())
    checkpoint.write_bytes_atomic(run_dir / "config.yaml", dump_yaml(cfg).encode())
    checkpoint.write_json_atomic(run_dir / "run.json", run_info)
    console.info(
        f"vocabulary {tokenizer.get_vocab_size():,} tokens, labels {labels.names}, {vocab.num_examples:,} training rows"
        f"{f', skipped {dict(vocab.bad_rows)}' if vocab.bad_rows else ''} ({time.perf_counter() - t0:.1f}s)"
    )
    if eval_warning:
        console.warn(eval_warning)
    return tokenizer, labels, run_info


def train(cfg: Config, resume: bool = False, config_path: str = "CONFIG",
          should_stop: Callable[[int, dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Train as `cfg` says; return the best evaluation report (on rank 0; {} on the other ranks)."""
    t = cfg.train
    run_dir = cfg.run_dir
    started = time.perf_counter()
    rank, world, device = init_distributed(t.device)
    set_threads(t.num_threads)
    if rank != 0:
        console.quiet()  # one progress display and one log: rank 0's
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible GEMMs
        torch.use_deterministic_algorithms(True)
    if rank == 0:  # one process at a time in run_dir; what killed saves left behind goes
        for name in checkpoint.lock_run_dir(run_dir, fresh=not resume):
            console.warn(f"removed {run_dir / name}, left behind by an interrupted save")
    log = MetricsLog(run_dir / "metrics.jsonl", run_dir / "tensorboard" if t.tensorboard and rank == 0 else None)
    workers = resolve_workers(cfg.data.num_workers)

    # ---- vocabulary, labels and run directory (fresh) or the checkpoint to continue from (resume)
    ckpt_state: dict[str, Any] | None = None
    if resume:
        check_resumable(cfg)
        ckpt, warnings = checkpoint.find(run_dir, "last")
        for w in warnings:
            console.warn(w)
        weights, ckpt_state, opt_state, rng = checkpoint.load(ckpt, verified=True)  # find() verified it
        tokenizer, labels = read_run_files(run_dir)
        run_info = json.loads((run_dir / "run.json").read_text())
        console.info(f"resuming {run_dir} from {ckpt.name} (step {ckpt_state['step']}, epoch {ckpt_state['epoch']})")
        if rank == 0:
            log.truncate_after(ckpt_state["step"])
            truncate_trace(run_dir / "trained-examples.tsv", ckpt_state["step"])
        if run_info.get("workers") is not None and run_info["workers"] != workers:
            raise ConfigError(
                f"cannot resume {run_dir} with {workers} data workers: it was trained with {run_info['workers']}, and "
                f"the stream position is per worker. Set data.num_workers={run_info['workers']}."
            )
    elif rank != 0:
        error = broadcast(None, world, setup=True)  # rank 0 builds the vocabulary meanwhile
        if error:
            raise SeqtrainError(error)
        tokenizer, labels = read_run_files(run_dir)
        run_info = json.loads((run_dir / "run.json").read_text())
    else:
        try:
            tokenizer, labels, run_info = prepare_run(cfg, workers, world, config_path)
        except SeqtrainError as e:
            broadcast(str(e), world, setup=True)
            raise
        broadcast(None, world, setup=True)
    if ckpt_state is None and plan_ranks(BatchStream(cfg.data, cfg.data.train_split, tokenizer, labels, t.batch_size, shuffle=True,
                                                     seed=cfg.seed, limit=cfg.data.max_train_examples, rank=rank, world=world),
                                         world, run_info) and rank == 0:
        checkpoint.write_json_atomic(run_dir / "run.json", run_info)
    if ckpt_state is not None and ckpt_state["train_state"].get("world", 1) != world:
        raise ConfigError(
            f"cannot resume {run_dir} with {world} processes: it was trained with {ckpt_state['train_state'].get('world', 1)}, "
            "and each process's position in the data stream is saved. Resume with the same --nproc_per_node."
        )

    # ---- model and optimizer; seeded so the same config and seed give the same weights
    seed_everything(cfg.seed)
    model = build_model(cfg.model, tokenizer.get_vocab_size(), labels.outputs).to(device)
    regression = labels.task == "regression"
    monitor = t.monitor if t.monitor != "auto" else ("mae" if regression else "accuracy")
    class_weights = None
    if t.class_weights == "balanced" and not regression:
        counts = torch.tensor(labels.counts, dtype=torch.float32).clamp(min=1)
        class_weights = (counts.sum() / (len(counts) * counts)).to(device)  # n / (C * count_c)
    optimizer = make_optimizer(model, t)
    steps_per_epoch = run_info["steps_per_epoch"]
    total_steps = min(t.max_steps or 10**12, t.epochs * steps_per_epoch)
    if t.warmup_steps > total_steps:
        console.warn(f"train.warmup_steps {t.warmup_steps} is longer than the run ({total_steps} steps): the learning rate "
                     f"stops at {lr_at(total_steps - 1, t, total_steps):.3g}, never reaching train.lr {t.lr:g}.")
    s: dict[str, Any] = {"step": 0, "epoch": 0, "best": None, "best_step": None, "bad_evals": 0, "positions": {}, "next_slot": 0,
                         "world": world, "last_eval_step": -1}
    ema_weights = None
    if ckpt_state is not None:
        if t.ema_decay:  # model.safetensors holds the average; training continues from the raw weights
            ema_weights, weights = weights, checkpoint.load_tensors(ckpt / "train-model.safetensors")
        model.load_state_dict(weights)
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        for k in s:
            s[k] = ckpt_state["train_state"].get(k, s[k])
        if "last_eval_step" not in ckpt_state["train_state"]:  # saved before it was: as then
            s["last_eval_step"] = s["step"]
        if "ranks" in ckpt_state:  # each rank continues from its own place in the stream
            s["positions"], s["next_slot"] = ckpt_state["ranks"][rank]
        restore_rng(ckpt_state["rng"], rng, rank)
    if cfg.model.pretrained_embeddings and ckpt_state is None:
        found, size = load_pretrained_embeddings(model, cfg.model.pretrained_embeddings, tokenizer.get_vocab(), cfg.tokenizer.lowercase)
        console.info(f"pretrained embeddings: {found:,} of {size:,} vocabulary words found ({found / size:.1%} coverage)")
        run_info["embedding_coverage"] = found / size
        if rank == 0:
            checkpoint.write_json_atomic(run_dir / "run.json", run_info)
    if cfg.model.init_from and ckpt_state is None:
        _, encoder = init_from_pretrained(cfg)
        load_encoder(model, encoder, cfg.model.init_from)
        console.info(f"encoder (embeddings and recurrent layers) from {cfg.model.init_from}; the head starts fresh")
    if cfg.model.freeze_embeddings:
        model.embedding.weight.requires_grad_(False)
    # train.ema_decay: `ema` is what gets evaluated and saved as model.safetensors; `model` trains.
    ema = copy.deepcopy(model).requires_grad_(False) if t.ema_decay else None
    if ema is not None and ema_weights is not None:
        ema.load_state_dict(ema_weights)
    inference_model = ema if ema is not None else model
    forward: torch.nn.Module = model
    # train.adversarial_eps forks the RNG around the clean pass: the CPU generator always, plus this accelerator's.
    rng_device, rng_devices = ("cuda", []) if device.type == "cpu" else (device.type, [device])
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    console.info(
        f"model: {cfg.model.cell.upper()} {count_parameters(model):,} parameters on {device}, "
        f"{torch.get_num_threads()} threads, {workers} data workers; {steps_per_epoch:,} steps per epoch, {total_steps:,} steps"
    )

    # ---- Ctrl-C / SIGTERM: finish the step, write last/, exit non-zero
    stop = StopSignals()  # Ctrl-C / SIGTERM / SIGHUP: finish the step, write last/, exit non-zero

    use_amp = device.type == "cuda" and t.precision != "fp32"
    amp_dtype = torch.bfloat16 if t.precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and t.precision == "fp16")
    reports: dict[int, dict[str, Any]] = {}

    def save(best: bool) -> None:
        """Every rank calls this (it gathers stream positions); rank 0 writes."""
        ranks = all_gather((s["positions"], s["next_slot"]), world)
        rng_json, rng_tensors = all_rng_states(world)
        if rank != 0:
            return
        state = {
            "step": s["step"], "epoch": s["epoch"], "train_state": dict(s), "ranks": ranks, "rng": rng_json,
            "_rng_tensors": rng_tensors, "metrics": {k: v for k, v in reports.get(s["step"], {}).items() if k != "arrays"},
            "model": to_dict(cfg)["model"], "vocab_size": tokenizer.get_vocab_size(), "labels": labels.names,
        }
        checkpoint.save(run_dir, s["step"], inference_model, optimizer, state, best=best, keep_last=t.keep_last,
                        train_model=model if ema is not None else None)

    def run_eval() -> bool:
        """Evaluate, log, checkpoint; True when early stopping says stop. Rank 0 evaluates, all ranks agree."""
        if rank != 0:
            save(best=False)
            return bool(broadcast(None, world))
        report = evaluate(inference_model, cfg, tokenizer, labels, cfg.data.eval_split, device, cfg.data.max_eval_examples)
        reports[s["step"]] = report
        keys = ("mae", "rmse", "r2", "spearman", "accuracy_rounded") if regression else ("accuracy", "f1_macro", "top_k_accuracy")
        log.write({"step": s["step"], "epoch": s["epoch"], "split": cfg.data.eval_split, "loss": report["loss"],
                   **{k: report[k] for k in keys if k in report}})
        value = report[monitor]
        improved = is_better(monitor, value, s["best"])
        if improved:
            s["best"], s["best_step"], s["bad_evals"] = value, s["step"], 0
        else:
            s["bad_evals"] += 1
        save(best=improved)
        shown = " ".join(f"{k} {report[k]:.4f}" for k in keys[:4] if k in report)
        bar.log(f"step {s['step']:,} epoch {s['epoch']}: {cfg.data.eval_split} loss {report['loss']:.4f} {shown}{'  (best)' if improved else ''}")
        # should_stop(step, report): a caller's verdict after each evaluation (`seqtrain tune`'s pruner); True ends the run.
        stop_now = should_stop is not None and should_stop(s["step"], report)
        return bool(broadcast((t.patience is not None and s["bad_evals"] >= t.patience) or stop_now, world))

    # ---- the loop
    model.train()
    early_stop = False
    window = new_window()
    with stop, console.TrainProgress(total_steps, s["step"], "mae" if regression else "acc") as bar:
        while s["epoch"] < t.epochs and s["step"] < total_steps and not early_stop:
            stream = BatchStream(
                cfg.data, cfg.data.train_split, tokenizer, labels, t.batch_size, shuffle=True, seed=cfg.seed,
                epoch=s["epoch"], limit=cfg.data.max_train_examples, resume=s["positions"], slot_offset=s["next_slot"],
                rank=rank, world=world,
            )
            loader = iter(make_loader(stream, workers))
            epoch_done = False
            while True:
                tw = time.perf_counter()
                batch = next(loader, None)
                window["wait"] += time.perf_counter() - tw
                # All ranks agree on whether to go on: one running out of data ends the epoch for
                # all (no rank waits forever in an all-reduce), a signal on any rank stops all.
                exhausted, signalled = all_reduce([float(batch is None), float(stop.signum is not None)], world, op="max")
                if signalled:
                    save(best=False)
                    signum = stop.signum or signal.SIGTERM
                    raise Interrupted(
                        f"stopped by {signal.Signals(signum).name} at step {s['step']}; last/ is saved. Resume with: "
                        f"seqtrain train {config_path} --resume",
                        signum,
                    )
                if exhausted:
                    epoch_done = True
                    break
                if s["step"] >= total_steps:
                    break
                assert batch is not None
                ids, lengths, y = batch["ids"].to(device), batch["lengths"].to(device), batch["labels"].to(device)

                lr = lr_at(s["step"], t, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                # train.adversarial_eps: a zero perturbation of the embeddings, whose gradient says
                # which way raises the loss; same RNG for both passes so they share dropout masks.
                delta = embedding_probe(ids, cfg.model.embedding_dim) if t.adversarial_eps else None
                with (
                    torch.random.fork_rng(rng_devices, enabled=delta is not None, device_type=rng_device),
                    torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp),
                ):
                    logits = forward(ids, lengths, delta)  # (B, C); under DDP, backward all-reduces the gradients
                    loss = task_loss(logits, y, labels, cfg, class_weights=class_weights)
                scaler.scale(loss).backward()
                if delta is not None and delta.grad is not None:
                    r_adv = adversarial_perturbation(delta.grad, t.adversarial_eps)  # (B, T, E)
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        adv_loss = task_loss(forward(ids, lengths, r_adv), y, labels, cfg, class_weights=class_weights)
                    scaler.scale(adv_loss).backward()  # gradients add up: clean loss + adversarial loss
                if t.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                if ema is not None and t.ema_decay:
                    ema_update(ema, model, t.ema_decay, s["step"])

                s["step"] += 1
                pos = batch["position"]
                s["positions"][str(pos["slot"])] = pos
                s["next_slot"] = (pos["slot"] + 1) % max(1, workers)
                window["tokens"] += int(batch["lengths"].sum())
                window["padded"] += batch["ids"].numel()
                window["unk"] += int((batch["ids"] == UNK_ID).sum())
                window["loss"] += loss.item() * len(y)
                if regression:  # the window's "accuracy" is the mean absolute error, in the target's units
                    window["correct"] += float((to_scores(logits.detach(), labels, cfg) - y).abs().sum())
                else:
                    window["correct"] += int((logits.argmax(-1) == y).sum())
                window["n"] += len(y)
                if t.trace_examples and rank == 0:
                    with open(run_dir / "trained-examples.tsv", "a") as trace:
                        trace.writelines(f"{s['step']}\t{h}\n" for h in example_hashes(batch["ids"], batch["lengths"]))

                if s["step"] % t.log_every == 0 or s["step"] == total_steps:
                    elapsed = time.perf_counter() - window["t0"]
                    if world > 1:  # the log speaks for all ranks
                        keys = ("tokens", "padded", "loss", "correct", "n", "unk")
                        window.update(zip(keys, all_reduce([window[k] for k in keys], world), strict=True))
                    record = {
                        "step": s["step"], "epoch": s["epoch"], "split": "train", "loss": window["loss"] / window["n"],
                        ("mae" if regression else "accuracy"): window["correct"] / window["n"], "lr": lr,
                        "tokens_per_sec": window["tokens"] / elapsed, "padding": 1 - window["tokens"] / window["padded"],
                        "data_wait": window["wait"] / elapsed, "unk_rate": window["unk"] / max(1, window["tokens"]),
                        "bad_rows": bad_rows(s["positions"], world),
                    }
                    if rank == 0:
                        log.write(record)
                    bar.update(s["step"], epoch=s["epoch"], loss=record["loss"], acc=window["correct"] / window["n"], tps=record["tokens_per_sec"])
                    window = new_window()
                else:
                    bar.update(s["step"])

                if t.eval_every and s["step"] % t.eval_every == 0:
                    s["last_eval_step"] = s["step"]
                    if run_eval():
                        early_stop = True
                        break
            if not epoch_done or early_stop:
                break  # max_steps or early stopping, inside the epoch
            if world > 1:
                note_dropped_rows(run_info, s["epoch"] + 1, epoch_rows(s["positions"], world), rank, run_dir, bar)
            s["epoch"] += 1
            s["positions"], s["next_slot"] = {}, 0
            if not t.eval_every and s["step"] != s["last_eval_step"]:
                s["last_eval_step"] = s["step"]
                early_stop = run_eval()
        if s["step"] != s["last_eval_step"]:
            run_eval()
    finish_distributed(world)
    if rank != 0:
        return {}

    best = reports.get(s["best_step"]) if s["best_step"] is not None else None
    if best is None:  # best was found before a resume: read it from its checkpoint
        best_dir = (run_dir / "best").resolve()
        best = json.loads((best_dir / "state.json").read_text()).get("metrics") or {}
    if best:
        checkpoint.write_json_atomic(run_dir / f"eval-{cfg.data.eval_split}.json", {
            **best, "checkpoint": f"best ({s['best_step']})", "train_seconds": time.perf_counter() - started,
            "threads": torch.get_num_threads(),
        })
        console.print_eval(best, f"{cfg.name}: best checkpoint (step {s['best_step']}) on {cfg.data.eval_split}")
    try:  # a picture is a bonus: a plotting problem must not fail a finished training
        from seqtrain.plots import plot_run_curves

        plot_run_curves([run_dir], run_dir / "curves.png")
    except Exception as e:
        console.warn(f"could not draw {run_dir / 'curves.png'}: {type(e).__name__}: {e}")
    console.info(f"run directory: {run_dir}  (best: {run_dir / 'best'}, last: {run_dir / 'last'})")
    checkpoint.unlock_run_dir(run_dir)
    return best
