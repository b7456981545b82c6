"""Model and training options that the accuracy work relies on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seqtrain.encoding import load_tokenizer
from seqtrain.errors import DataError
from seqtrain.metrics import read_metrics
from seqtrain.train import train
from tests.conftest import synthetic_rows, tiny_config, write_hub_folder


def test_pretrained_embeddings_coverage_and_freeze(tiny_data: Path, tmp_path: Path) -> None:
    vectors = tmp_path / "vectors.txt"
    # a word2vec-style header, then vectors for two vocabulary words and one unknown word
    vectors.write_text(
        "3 16\n"
        + "great "
        + " ".join(["0.5"] * 16)
        + "\nawful "
        + " ".join(["-0.5"] * 16)
        + "\nzzzunseen "
        + " ".join(["1.0"] * 16)
        + "\n"
    )
    cfg = tiny_config(
        tiny_data,
        tmp_path / "run",
        model={"pretrained_embeddings": str(vectors), "freeze_embeddings": True},
        train={"max_steps": 10},
    )
    train(cfg)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    vocab = load_tokenizer(tmp_path / "run" / "tokenizer.json").get_vocab()
    assert info["embedding_coverage"] == pytest.approx(2 / len(vocab))
    weights = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))["embedding.weight"]
    assert weights[vocab["great"]].tolist() == [0.5] * 16, "frozen: unchanged by training"


def test_pretrained_embeddings_wrong_dimension_is_clear(tiny_data: Path, tmp_path: Path) -> None:
    vectors = tmp_path / "v.txt"
    vectors.write_text("great 0.1 0.2 0.3\n")
    cfg = tiny_config(tiny_data, tmp_path / "run", model={"pretrained_embeddings": str(vectors)})
    with pytest.raises(DataError, match="line 1: 3 numbers, but model.embedding_dim is 16"):
        train(cfg)


def test_early_stopping_keeps_best(tiny_data: Path, tmp_path: Path) -> None:
    # a learning rate too small to change any prediction: accuracy never improves after the first
    # evaluation, so patience 2 stops at the third
    cfg = tiny_config(
        tiny_data,
        tmp_path / "run",
        train={
            "epochs": 10,
            "eval_every": 5,
            "patience": 2,
            "lr": 1e-9,
            "lr_schedule": "constant",
            "monitor": "accuracy",
        },
    )
    train(cfg)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "validation"]
    assert [r["step"] for r in evals] == [5, 10, 15], "stopped long before 10 epochs"
    best = json.loads((tmp_path / "run" / "best" / "state.json").read_text())["step"]
    assert best == 5


def short_run(
    data: Path, out: Path, steps: int = 6, **train_options: object
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """A few steps, a train line each: (train lines, final weights)."""
    train(
        tiny_config(
            data,
            out,
            data={"max_eval_examples": 20},
            train={"max_steps": steps, "log_every": 1, "lr_schedule": "linear", **train_options},
        )
    )
    lines = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    return lines, load_file(str(out / "last" / "model.safetensors"))


def test_each_training_option_shows_its_own_effect(tiny_data: Path, tmp_path: Path) -> None:
    """Against one baseline (linear decay, AdamW, no smoothing, no class weights), each option changes
    what it should, so an option that silently did nothing fails here."""
    from seqtrain.config import Config
    from seqtrain.encoding import Labels
    from seqtrain.losses import task_loss

    base_lines, base = short_run(tiny_data, tmp_path / "base")
    lr = 0.01  # tiny_config's
    assert [r["lr"] for r in base_lines] == pytest.approx([lr * (1 - k / 6) for k in range(6)])

    # cosine: its own curve, not the linear one
    cos_lines, _ = short_run(tiny_data, tmp_path / "cosine", lr_schedule="cosine")
    assert [r["lr"] for r in cos_lines] == pytest.approx(
        [lr * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    )

    # label smoothing: a confident right answer still costs something, and training moves differently
    cfg = Config()
    labels = Labels(names=["a", "b"], values=[0, 1])
    confident, y = torch.tensor([[8.0, -8.0]]), torch.tensor([0])
    assert task_loss(confident, y, labels, cfg).item() < 1e-3
    cfg.train.label_smoothing = 0.1
    assert task_loss(confident, y, labels, cfg).item() > 0.5
    _, smoothed = short_run(tiny_data, tmp_path / "smooth", label_smoothing=0.1)
    assert not torch.equal(smoothed["head.weight"], base["head.weight"])

    # SGD: momentum buffers instead of Adam's moments, and different weights
    _, sgd = short_run(tiny_data, tmp_path / "sgd", optimizer="sgd", lr=0.1)
    opt_keys = {
        k.split("/", 1)[1] for k in load_file(str(tmp_path / "sgd" / "last" / "optimizer.safetensors"))
    }
    assert opt_keys == {"momentum_buffer"} and not torch.equal(sgd["head.weight"], base["head.weight"])

    # balanced class weights: on imbalanced labels the very first loss (same weights, same batch) differs
    rows = synthetic_rows(200, 0)
    for i, r in enumerate(rows):
        r["label"] = 1 if i % 5 == 0 else 0  # 20% positive; the texts keep their words
    skewed = write_hub_folder(tmp_path / "skewed", {"train": rows, "validation": synthetic_rows(40, 1)})
    plain_lines, plain = short_run(skewed, tmp_path / "plain", steps=2)
    weighted_lines, weighted = short_run(skewed, tmp_path / "balanced", steps=2, class_weights="balanced")
    assert abs(weighted_lines[0]["loss"] - plain_lines[0]["loss"]) > 1e-4
    assert not torch.equal(weighted["head.weight"], plain["head.weight"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "option",
    [
        {"label_smoothing": 0.1},
        {"lr_schedule": "cosine", "warmup_steps": 5},
        {"optimizer": "sgd", "lr": 0.1},
        {"class_weights": "balanced"},
    ],
)
def test_training_options_run_and_learn(tiny_data: Path, tmp_path: Path, option: dict) -> None:
    report = train(tiny_config(tiny_data, tmp_path / "run", train={"epochs": 3, **option}))
    assert report["accuracy"] > 0.7


def test_ema_weights_are_what_gets_evaluated_and_saved(tiny_data: Path, tmp_path: Path) -> None:
    from seqtrain.inference.evaluation import evaluate
    from seqtrain.inference.run import load_run
    from seqtrain.train import ema_update

    report = train(tiny_config(tiny_data, tmp_path / "run", train={"epochs": 3, "ema_decay": 0.95}))
    assert report["accuracy"] > 0.7
    run, _ = load_run(tmp_path / "run")  # reads model.safetensors: the average
    again = evaluate(run.model, run.config, run.tokenizer, run.labels, "validation", run.device)
    assert again["accuracy"] == report["accuracy"] and again["loss"] == pytest.approx(
        report["loss"], rel=1e-5
    )
    assert (tmp_path / "run" / "best" / "train-model.safetensors").is_file()

    # the update: warm-up decay (1 + step) / (10 + step) caps the configured one early on
    ema, model = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        ema.weight.fill_(0.0)
        model.weight.fill_(1.0)
    ema_update(ema, model, 0.99, step=0)  # d = 0.1
    assert ema.weight.item() == pytest.approx(0.9)
    ema_update(ema, model, 0.5, step=1000)  # d = 0.5
    assert ema.weight.item() == pytest.approx(0.95)


@pytest.mark.parametrize(
    "model",
    [
        {"num_layers": 2, "bidirectional": True, "pooling": "attention", "embedding_dropout": 0.1},
        {"cell": "rnn", "pooling": "mean"},
        {"cell": "lstm", "pooling": "max"},
        {"cell": "lstm", "bidirectional": True, "pooling": "max", "word_dropout": 0.1, "weight_drop": 0.3},
        {"cell": "lstm", "pooling": "max", "head_norm": True},
    ],
)
def test_model_options_train(tiny_data: Path, tmp_path: Path, model: dict) -> None:
    report = train(tiny_config(tiny_data, tmp_path / "run", model=model, train={"epochs": 3}))
    assert report["accuracy"] > 0.7
    train_lines = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert all(0 <= r["unk_rate"] < 0.05 for r in train_lines)


def test_tensorboard_logging(tiny_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    train(
        tiny_config(
            tiny_data, tmp_path / "run", train={"max_steps": 10, "eval_every": 5, "tensorboard": True}
        )
    )
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_adversarial_perturbation_points_uphill_with_norm_eps() -> None:
    from seqtrain.config import ModelConfig
    from seqtrain.model import build_model
    from seqtrain.train import adversarial_perturbation, embedding_probe

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(cell="gru", embedding_dim=8, hidden_size=8, pooling="max", bidirectional=True), 50, 2
    ).eval()
    ids, lengths = torch.randint(2, 50, (4, 9)), torch.tensor([9, 7, 3, 1])
    ids[torch.arange(9).unsqueeze(0) >= lengths.unsqueeze(1)] = 0  # right padding
    y = torch.tensor([0, 1, 1, 0])
    delta = embedding_probe(ids, 8)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    loss_fn(model(ids, lengths, delta), y).sum().backward()
    assert delta.grad is not None
    r = adversarial_perturbation(delta.grad, 0.5)
    assert torch.linalg.vector_norm(r, dim=(1, 2)).tolist() == pytest.approx([0.5] * 4, rel=1e-4)
    assert r[2, 3:].abs().max() == 0 and r[3, 1:].abs().max() == 0, "padding is never perturbed"
    with torch.no_grad():
        clean = loss_fn(model(ids, lengths), y)
        adversarial = loss_fn(model(ids, lengths, r), y)
        noise = torch.randn_like(r) * (torch.arange(9) < lengths.unsqueeze(1)).unsqueeze(-1)
        random = loss_fn(
            model(ids, lengths, 0.5 * noise / torch.linalg.vector_norm(noise, dim=(1, 2), keepdim=True)), y
        )
    assert (adversarial > clean).all(), "the gradient direction raises every text's loss"
    assert (adversarial - clean > (random - clean).abs()).all(), (
        "far more than a random move of the same size"
    )


@pytest.mark.slow
def test_adversarial_training_learns_and_is_reproducible(tiny_data: Path, tmp_path: Path) -> None:
    runs = {}
    for name, eps in [("a", 1.0), ("b", 1.0), ("plain", 0.0)]:
        cfg = tiny_config(tiny_data, tmp_path / name, train={"epochs": 3, "adversarial_eps": eps})
        runs[name] = (train(cfg), load_file(str(tmp_path / name / "last" / "model.safetensors")))
    assert runs["a"][0]["accuracy"] > 0.7
    assert all(torch.equal(runs["a"][1][k], runs["b"][1][k]) for k in runs["a"][1]), "same seed, same weights"
    assert not torch.equal(runs["a"][1]["head.weight"], runs["plain"][1]["head.weight"]), (
        "the adversarial loss changes training"
    )


def test_virtual_adversarial_direction_changes_the_prediction_far_more_than_a_random_one() -> None:
    """One power iteration finds a move of the embeddings, eps long per text and 0 on the padding, that
    changes the predicted distribution more than random moves of the same length; its loss is that KL and
    its gradient reaches the weights. Catches a wrong sign, a lost power iteration or a detached loss."""
    from seqtrain.config import ModelConfig
    from seqtrain.model import build_model
    from seqtrain.train import kl_from, virtual_adversarial_loss

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(cell="lstm", embedding_dim=8, hidden_size=8, pooling="mean", bidirectional=True), 50, 3
    ).eval()
    ids, lengths = torch.randint(2, 50, (6, 9)), torch.tensor([9, 8, 7, 5, 3, 2])
    ids[torch.arange(9).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    vat = virtual_adversarial_loss(model, model, ids, lengths, eps=2.0)
    vat.backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        clean = model(ids, lengths).log_softmax(-1)
        real = (torch.arange(9) < lengths.unsqueeze(1)).unsqueeze(-1)
        randoms = []
        for seed in range(20):
            torch.manual_seed(100 + seed)
            noise = torch.randn(6, 9, 8) * real
            noise = 2.0 * noise / torch.linalg.vector_norm(noise, dim=(1, 2), keepdim=True)
            randoms.append(kl_from(clean, model(ids, lengths, noise)).item())
    assert vat.item() > 3 * max(randoms), (vat.item(), max(randoms))


def test_virtual_adversarial_training_reads_the_unlabeled_texts(tiny_data: Path, tmp_path: Path) -> None:
    """train.vat_eps with pretrain.path: each step takes one batch of the unlabeled source (its place is
    in the checkpoint, wrapping into a new pass at its end), training changes, and the model still learns."""
    unlabeled = write_hub_folder(
        tmp_path / "unlabeled", {"train": [{"text": r["text"]} for r in synthetic_rows(100, 7)]}
    )
    base = tiny_config(tiny_data, tmp_path / "base", train={"epochs": 2})
    vat = tiny_config(
        tiny_data, tmp_path / "vat", train={"epochs": 2, "vat_eps": 1.0}, pretrain={"path": str(unlabeled)}
    )
    assert train(vat)["accuracy"] > 0.7
    train(base)
    state = json.loads((tmp_path / "vat" / "last" / "state.json").read_text())
    steps = state["step"]  # 2 epochs of 600 rows in batches of 16: 76 steps; 100 unlabeled rows: 7 a pass
    epoch, position = state["train_state"]["unlabeled_epoch"], state["train_state"]["unlabeled_position"]
    into_pass = steps % 7  # batches of this pass so far; one of a pass's 7 batches holds the last 4 rows
    assert epoch == steps // 7, (steps, epoch)
    assert position["0"]["rows"] in {into_pass * 16, (into_pass - 1) * 16 + 4}, (steps, position["0"]["rows"])
    a = load_file(str(tmp_path / "vat" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "base" / "last" / "model.safetensors"))
    assert not torch.equal(a["head.weight"], b["head.weight"]), (
        "the virtual adversarial loss changes training"
    )


def test_virtual_adversarial_training_refuses_regression(tmp_path: Path) -> None:
    from seqtrain.config import load_config
    from seqtrain.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("data: {path: x}\nmodel: {task: regression}\ntrain: {vat_eps: 1.0}\n")
    with pytest.raises(ConfigError, match="train.vat_eps needs class probabilities"):
        load_config(path)


def test_head_norm_standardizes_what_the_head_reads_and_handles_a_batch_of_one() -> None:
    """model.head_norm: in training the head reads each pooled feature standardized across the batch
    (pooled states that barely differ between texts become ones that do); a training batch of one
    text uses the running statistics instead of failing; evaluation uses them too."""
    from seqtrain.config import ModelConfig
    from seqtrain.model import build_model

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(cell="gru", embedding_dim=8, hidden_size=8, dropout=0.0, head_norm=True), 50, 2
    )
    seen: list[torch.Tensor] = []
    assert model.head is not None
    model.head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    ids, lengths = torch.randint(2, 50, (16, 7)), torch.full((16,), 7)
    model.train()
    model(ids, lengths)
    torch.testing.assert_close(seen[-1].mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(seen[-1].std(0, unbiased=False), torch.ones(8), atol=1e-2, rtol=0)
    one = model(ids[:1], lengths[:1])
    assert model.training, "the batch of one leaves the model in training mode"
    model.eval()
    torch.testing.assert_close(one, model(ids[:1], lengths[:1]))


def test_ema_keeps_the_current_head_norm_statistics(tiny_data: Path, tmp_path: Path) -> None:
    """With train.ema_decay the saved model is the weights' moving average; its batch-norm running
    statistics must be the trained model's, not the untouched ones of the copy made at step 0."""
    train(tiny_config(tiny_data, tmp_path / "run", model={"head_norm": True}, train={"ema_decay": 0.9}))
    average = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    raw = load_file(str(tmp_path / "run" / "last" / "train-model.safetensors"))
    assert not torch.equal(average["norm.running_mean"], torch.zeros_like(average["norm.running_mean"]))
    assert torch.equal(average["norm.running_mean"], raw["norm.running_mean"])
