"""Language-model pretraining (seqtrain.pretrain) and fine-tuning from it (model.init_from), on real SST-2
text."""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqtrain import checkpoint
from seqtrain.config import Config, from_dict, to_dict
from seqtrain.data import heldout_texts, is_heldout, open_split, text_sources
from seqtrain.encoding import encode, load_tokenizer
from seqtrain.errors import ConfigError
from seqtrain.model import LanguageModel, build_model, full_softmax_nll, sampled_softmax_nll
from seqtrain.pretrain import init_from_pretrained, load_encoder, pretrain, start_from_language_model
from seqtrain.train import train
from tests.conftest import REAL_DATA, ROOT, write_yaml

SST2 = REAL_DATA / "sst2"


def lm_config(out: Path, **changes: dict) -> Config:
    raw = {
        "name": "lm",
        "output_dir": str(out),
        "seed": 0,
        "data": {"path": str(SST2), "text_column": "sentence", "max_train_examples": 6000},
        "tokenizer": {"vocab_size": 3000},
        "model": {"embedding_dim": 32, "hidden_size": 32, "bidirectional": True, "dropout": 0.1},
        "pretrain": {"path": None, "max_length": 64, "heldout_fraction": 0.05, "softmax": "full"},
        "train": {"batch_size": 32, "epochs": 3, "lr": 0.005, "log_every": 20, "num_threads": 1},
    }
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    return from_dict(raw)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lm") / "run"
    pretrain(lm_config(out))
    return out


def test_pretraining_reads_pretrain_max_length_tokens_whatever_the_classifier_reads(tmp_path: Path) -> None:
    """A config shared with a classifier whose n-gram path reads further (data.ngram_max_length): the
    language model still reads pretrain.max_length tokens of each text."""
    from seqtrain.encoding import read_length

    cfg = lm_config(tmp_path, data={"ngram_max_length": 4096}, model={"ngrams": 2})
    assert [read_length(source) for source, _ in text_sources(cfg)] == [64]


def unigram_perplexity(cfg: Config, run: Path) -> float:
    """Add-one unigram model of the training rows, scored on the held-out rows, over the same targets
    (every token but the first of each text) as the language model's forward direction."""
    tokenizer = load_tokenizer(run / "tokenizer.json")
    source = text_sources(cfg)[0][0]
    counts: collections.Counter[int] = collections.Counter()
    for row in open_split(source, "train", cfg.data.max_train_examples):
        if not is_heldout(row["sentence"], cfg.pretrain.heldout_fraction):
            counts.update(encode(tokenizer, [row["sentence"]], source)[0][1:])
    total, vocab = sum(counts.values()), tokenizer.get_vocab_size()
    held = encode(tokenizer, heldout_texts(cfg), source)
    nll = [-math.log((counts[i] + 1) / (total + vocab)) for seq in held for i in seq[1:]]
    return math.exp(sum(nll) / len(nll))


@pytest.mark.slow
def test_pretraining_drives_heldout_perplexity_well_below_unigram(pretrained: Path) -> None:
    cfg = lm_config(pretrained)
    heldout = [
        r
        for r in map(json.loads, (pretrained / "metrics.jsonl").read_text().splitlines())
        if r["split"] == "heldout"
    ]
    unigram = unigram_perplexity(cfg, pretrained)
    best = min(r["perplexity"] for r in heldout)
    assert best < 0.8 * unigram, (best, unigram)
    assert heldout[-1]["perplexity_backward"] < 0.8 * unigram  # the backward direction learned too
    assert heldout[-1]["perplexity"] < heldout[0]["perplexity"]
    assert (pretrained / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_heldout_rows_are_never_trained_on(pretrained: Path) -> None:
    cfg = lm_config(pretrained)
    texts = heldout_texts(cfg)
    assert texts and all(is_heldout(t, cfg.pretrain.heldout_fraction) for t in texts)
    run = json.loads((pretrained / "run.json").read_text())
    rows = sum(1 for r in open_split(text_sources(cfg)[0][0], "train", 6000) if r["sentence"].strip())
    held = sum(
        1 for r in open_split(text_sources(cfg)[0][0], "train", 6000) if is_heldout(r["sentence"], 0.05)
    )
    assert run["num_train_examples"] == rows - held


@pytest.mark.slow
def test_sampled_softmax_trains_the_exact_perplexity_down(tmp_path: Path) -> None:
    cfg = lm_config(tmp_path / "sampled", pretrain={"softmax": "sampled", "num_samples": 256})
    pretrain(cfg)
    heldout = [
        r
        for r in map(json.loads, (tmp_path / "sampled" / "metrics.jsonl").read_text().splitlines())
        if r["split"] == "heldout"
    ]
    assert heldout[-1]["perplexity"] < 0.8 * unigram_perplexity(cfg, tmp_path / "sampled")


def test_sampled_softmax_gradient_follows_the_full_softmax_gradient() -> None:
    # Sampled softmax is trained for its gradient: averaged over draws it should point where the full
    # softmax's does (cosine 0.998 here). Without the log-Q correction it drops to 0.971.
    torch.manual_seed(0)
    V, H, N = 2000, 16, 300
    h = torch.randn(N, H, requires_grad=True)
    weight, bias = torch.randn(V, H) * 0.3, torch.randn(V)
    y = torch.randint(0, V, (N,))
    (full,) = torch.autograd.grad(full_softmax_nll(h, y, weight, bias), h)
    sampled = sum(torch.autograd.grad(sampled_softmax_nll(h, y, weight, bias, 1000), h)[0] for _ in range(10))
    assert float(torch.nn.functional.cosine_similarity(sampled.flatten(), full.flatten(), 0)) > 0.99


def test_backward_direction_predicts_the_previous_token() -> None:
    # A model whose backward states carry the token at their own step must score the previous token:
    # check the pairs `targets` builds on a hand-made batch.
    model = LanguageModel(lm_config(Path("unused")).model, 20)
    ids = torch.tensor([[2, 3, 4, 5], [6, 7, 0, 0]])
    lengths = torch.tensor([4, 2])
    states = torch.cat(
        [ids.unsqueeze(-1).float().expand(-1, -1, 32), -ids.unsqueeze(-1).float().expand(-1, -1, 32)], -1
    )
    (h_fwd, y_fwd), (h_bwd, y_bwd) = model.targets(ids, lengths, states)
    assert h_fwd[:, 0].tolist() == [2, 3, 4, 6] and y_fwd.tolist() == [3, 4, 5, 7]  # state at t -> token t+1
    assert (-h_bwd[:, 0]).tolist() == [3, 4, 5, 7] and y_bwd.tolist() == [
        2,
        3,
        4,
        6,
    ]  # state at t -> token t-1


@pytest.mark.slow
def test_init_from_loads_exactly_the_pretrained_tensors(pretrained: Path, tmp_path: Path) -> None:
    cfg = lm_config(tmp_path / "ft", model={"init_from": str(pretrained), "pooling": "max"})
    tokenizer, encoder = init_from_pretrained(cfg)
    assert tokenizer.to_str() == load_tokenizer(pretrained / "tokenizer.json").to_str()
    saved, _, _, _ = checkpoint.load(checkpoint.find(pretrained, "best")[0])
    torch.manual_seed(1)
    model = build_model(cfg.model, tokenizer.get_vocab_size(), 2)
    fresh_head = model.head.weight.detach().clone()  # type: ignore[union-attr]
    load_encoder(model, encoder, str(pretrained))
    own = model.state_dict()
    names = [n for n in own if n.startswith(("embedding.", "layers."))]
    assert names and all(torch.equal(own[n], saved["encoder." + n]) for n in names)
    assert torch.equal(model.head.weight, fresh_head)  # type: ignore[union-attr]


@pytest.mark.slow
def test_pretrain_with_init_from_continues_that_language_model(pretrained: Path, tmp_path: Path) -> None:
    """ULMFiT's second stage: `pretrain` with model.init_from starts from the whole language model (same
    output layer) or from its encoder (another softmax: a fresh output layer), reuses its tokenizer, and
    after a few steps is far better than the same few steps from scratch."""
    cont = lm_config(tmp_path / "cont", model={"init_from": str(pretrained)}, train={"max_steps": 10})
    saved, _, _, _ = checkpoint.load(checkpoint.find(pretrained, "best")[0])
    vocab_size = load_tokenizer(pretrained / "tokenizer.json").get_vocab_size()
    model = LanguageModel(cont.model, vocab_size, "full", 64, [100])
    assert start_from_language_model(cont, model) == "the whole language model"
    assert all(torch.equal(t, saved[n]) for n, t in model.state_dict().items())
    adaptive = LanguageModel(cont.model, vocab_size, "adaptive", 64, [100, 1000])
    fresh_output = {n: t.clone() for n, t in adaptive.state_dict().items() if not n.startswith("encoder.")}
    assert start_from_language_model(cont, adaptive).startswith("the encoder")
    for n, t in adaptive.state_dict().items():
        assert torch.equal(t, saved[n] if n.startswith("encoder.") else fresh_output[n]), n

    pretrain(cont)
    scratch = lm_config(tmp_path / "scratch", train={"max_steps": 10})
    pretrain(scratch)
    assert (tmp_path / "cont" / "tokenizer.json").read_text() == (pretrained / "tokenizer.json").read_text()

    def perplexity(run: Path) -> float:
        return json.loads((run / "pretrain-summary.json").read_text())["heldout_perplexity"]

    assert perplexity(tmp_path / "cont") < 0.7 * perplexity(tmp_path / "scratch")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("model", "hidden_size", 48),
        ("model", "cell", "gru"),
        ("tokenizer", "vocab_size", 5000),
    ],
)
def test_init_from_with_other_shapes_or_vocabulary_is_a_clear_error(
    pretrained: Path, tmp_path: Path, section: str, key: str, value: object
) -> None:
    changes: dict = {"model": {"init_from": str(pretrained)}}
    changes.setdefault(section, {})[key] = value
    cfg = lm_config(tmp_path / "ft", **changes)
    with pytest.raises(
        ConfigError, match=rf"{section}\.{key} is {value!r}.*has|{section}\.{key} is {value!r}.*built with"
    ):
        init_from_pretrained(cfg)


@pytest.mark.slow
def test_init_from_a_shape_mismatch_names_the_tensor_and_both_shapes(pretrained: Path) -> None:
    cfg = lm_config(pretrained)
    _, encoder = init_from_pretrained(
        from_dict({**to_dict(cfg), "model": {**to_dict(cfg)["model"], "init_from": str(pretrained)}})
    )
    model = build_model(cfg.model, 4000, 2)  # another vocabulary size
    with pytest.raises(ConfigError, match=r"embedding.weight is \(\d+, 32\) in .* but \(4000, 32\) here"):
        load_encoder(model, encoder, str(pretrained))


@pytest.mark.slow
def test_finetune_from_the_pretrained_encoder_learns_sst2(pretrained: Path, tmp_path: Path) -> None:
    cfg = lm_config(
        tmp_path / "ft",
        model={"init_from": str(pretrained), "pooling": "max", "dropout": 0.2},
        data={"label_column": "label", "max_eval_examples": 600, "max_length": 64},
        train={"epochs": 3, "eval_every": 0, "lr": 0.01},
    )
    report = train(cfg)
    assert report["accuracy"] > 0.70, report["accuracy"]
    assert (tmp_path / "ft" / "tokenizer.json").read_text() == (pretrained / "tokenizer.json").read_text()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "seqtrain", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.subprocess
def test_init_from_mismatch_on_the_command_line_exits_2_without_traceback(
    pretrained: Path, tmp_path: Path
) -> None:
    cfg = lm_config(
        tmp_path / "ft",
        model={"init_from": str(pretrained), "hidden_size": 64},
        data={"label_column": "label"},
    )
    path = tmp_path / "ft.yaml"
    write_yaml(path, cfg)
    done = run_cli("train", str(path))
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr
    assert "model.hidden_size is 64" in done.stderr and "32" in done.stderr


@pytest.mark.subprocess
def test_pretrain_resumes_bitwise_after_sigkill(tmp_path: Path) -> None:
    changes = {"data": {"max_train_examples": 1500}, "train": {"epochs": 2, "eval_every": 15}}
    pretrain(lm_config(tmp_path / "straight", **changes))  # the reference, in this process
    config = tmp_path / "killed.yaml"
    write_yaml(config, lm_config(tmp_path / "killed", **changes))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-m", "tests.fault_entry", "kill-after-save=45", "pretrain", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert killed.returncode == -9, killed.stderr
    resumed = run_cli("pretrain", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, _, _, _ = checkpoint.load(checkpoint.find(tmp_path / "straight", "last")[0])
    b, state, _, _ = checkpoint.load(checkpoint.find(tmp_path / "killed", "last")[0])
    assert state["step"] > 45
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupt_on_an_epochs_last_batch_keeps_that_epochs_evaluation(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    import seqtrain.pretrain
    from seqtrain.metrics import read_metrics
    from seqtrain.runtime import Interrupted
    from tests.conftest import tiny_config

    cfg = tiny_config(
        tiny_data,
        tmp_path / "lm",
        train={"epochs": 2, "eval_every": 0},
        pretrain={"path": None, "heldout_fraction": 0.05, "softmax": "full"},
    )
    real = seqtrain.pretrain.lr_at

    def lr_at_then_sigterm(step: int, *args: object) -> float:  # SIGTERM while the epoch's last batch trains
        if step == json.loads((tmp_path / "lm" / "run.json").read_text())["steps_per_epoch"] - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(seqtrain.pretrain, "lr_at", lr_at_then_sigterm)
    with pytest.raises(Interrupted):
        pretrain(cfg)
    monkeypatch.undo()
    pretrain(cfg, resume=True)
    evals = [r for r in read_metrics(tmp_path / "lm" / "metrics.jsonl") if r["split"] == "heldout"]
    assert [r["epoch"] for r in evals] == [1, 2]


@pytest.mark.slow
def test_init_with_init_from_writes_a_config_that_fine_tunes_from_the_run(
    pretrained: Path, tmp_path: Path
) -> None:
    from seqtrain.config import load_config
    from seqtrain.init_config import write_starter

    write_starter(str(SST2), tmp_path / "plain.yaml", sample=500)
    with pytest.raises(
        ConfigError
    ):  # a plain starter config has other shapes than the tiny pretrained encoder
        init_from_pretrained(load_config(tmp_path / "plain.yaml", [f"model.init_from={pretrained}"]))
    write_starter(str(SST2), tmp_path / "ft.yaml", sample=500, init_from=str(pretrained))
    cfg = load_config(tmp_path / "ft.yaml")
    assert cfg.model.init_from == str(pretrained) and cfg.model.hidden_size == 32
    tokenizer, encoder = init_from_pretrained(cfg)  # shapes and tokenizer keys match: no error
    assert encoder["embedding.weight"].shape[0] == tokenizer.get_vocab_size()


@pytest.mark.slow
def test_the_training_stream_leaves_out_exactly_the_heldout_rows(pretrained: Path) -> None:
    # run.json's row count comes from the vocabulary pass; this counts what the training stream yields.
    # (Token ids cannot tell texts apart: different texts of unknown words encode alike.)
    from seqtrain.data import BatchStream

    cfg = lm_config(pretrained)
    tokenizer = load_tokenizer(pretrained / "tokenizer.json")

    def rows(heldout: float) -> int:
        stream = BatchStream(
            cfg.data,
            "train",
            tokenizer,
            None,
            64,
            shuffle=False,
            limit=cfg.data.max_train_examples,
            sources=text_sources(cfg),
            heldout=heldout,
        )
        return sum(len(batch["lengths"]) for batch in stream)

    expected = json.loads((pretrained / "run.json").read_text())["num_train_examples"]
    assert rows(cfg.pretrain.heldout_fraction) == expected
    assert rows(0.0) == expected + len(
        heldout_texts(
            from_dict({**to_dict(cfg), "pretrain": {**to_dict(cfg)["pretrain"], "max_heldout_texts": 10**6}})
        )
    )
