from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from seqtrain.config import ModelConfig
from seqtrain.encoding import PAD_ID
from seqtrain.model import build_model, reverse_within_length


def test_reverse_within_length_keeps_padding_and_is_an_involution() -> None:
    lengths = torch.tensor([3, 5, 1])
    idx = reverse_within_length(lengths, 5)
    assert idx.tolist() == [[2, 1, 0, 3, 4], [4, 3, 2, 1, 0], [0, 1, 2, 3, 4]]
    assert torch.equal(idx.gather(1, idx), torch.arange(5).expand(3, 5))


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("pooling", ["last", "mean", "max", "attention"])
def test_prediction_does_not_depend_on_the_batch(cell: str, bidirectional: bool, pooling: str) -> None:
    """A short text alone and inside a batch of long, padded texts gets the same logits."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        cell=cell,
        bidirectional=bidirectional,
        pooling=pooling,
        num_layers=2,  # type: ignore[arg-type]
        embedding_dim=16,
        hidden_size=24,
    )
    model = build_model(cfg, vocab_size=50, num_classes=3).eval()
    short = torch.randint(2, 50, (1, 4))
    batch = torch.zeros(6, 30, dtype=torch.long)
    batch[:5] = torch.randint(2, 50, (5, 30))
    batch[5, :4] = short
    lengths = torch.tensor([30, 25, 30, 17, 30, 4])
    with torch.no_grad():
        alone = model(short, torch.tensor([4]))
        inside = model(batch, lengths)[5:]
        twice = model(short, torch.tensor([4]))  # no state carried between calls
    assert torch.allclose(alone, inside, atol=1e-5), (alone - inside).abs().max()
    assert torch.equal(alone, twice)


def test_padding_tokens_do_not_change_the_result() -> None:
    """Garbage in the padded positions (not just zeros) never reaches the output."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(cell="lstm", bidirectional=True, pooling="last"), 50, 2).eval()
    ids = torch.randint(2, 50, (2, 10))
    lengths = torch.tensor([10, 6])
    noisy = ids.clone()
    noisy[1, 6:] = torch.randint(2, 50, (4,))
    with torch.no_grad():
        assert torch.allclose(model(ids, lengths), model(noisy, lengths), atol=1e-6)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_each_cell_learns_a_few_steps(cell: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(cell=cell, embedding_dim=16, hidden_size=16, dropout=0.0), 20, 2)  # type: ignore[arg-type]
    ids = torch.randint(2, 20, (32, 12))
    y = (ids[:, 0] < 10).long()  # the label is in the first token: the last step must carry it
    lengths = torch.full((32,), 12)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(model(ids, lengths), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_word_dropout_and_weight_drop_act_in_training_only(cell: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(
        cell=cell,
        embedding_dim=8,
        hidden_size=8,
        bidirectional=True,
        dropout=0.0,  # type: ignore[arg-type]
        word_dropout=0.3,
        weight_drop=0.5,
    )
    model = build_model(cfg, vocab_size=30, num_classes=2)
    ids, lengths = torch.randint(2, 30, (4, 9)), torch.tensor([9, 7, 3, 1])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, lengths), model(ids, lengths)), "deterministic in eval"
        plain = build_model(
            ModelConfig(cell=cell, embedding_dim=8, hidden_size=8, bidirectional=True, dropout=0.0), 30, 2
        )  # type: ignore[arg-type]
        plain.load_state_dict(model.state_dict())
        assert torch.equal(model(ids, lengths), plain.eval()(ids, lengths)), "no effect outside training"
    model.train()
    a, b = model(ids, lengths), model(ids, lengths)
    assert not torch.equal(a, b), "a fresh mask each call in training"
    a.sum().backward()
    for rnn in model.layers[0]:  # type: ignore[union-attr]
        assert (
            rnn.weight_hh_l0.grad is not None and rnn.weight_hh_l0.grad.abs().sum() > 0
        )  # gradients reach the dropped weights
    # the dropped weights are used for the call only: the parameters themselves are untouched
    assert torch.equal(
        model.state_dict()["layers.0.0.weight_hh_l0"], plain.state_dict()["layers.0.0.weight_hh_l0"]
    )

    # word dropout replaces real tokens with <unk> and never touches padding
    from seqtrain.encoding import UNK_ID

    seen: list[torch.Tensor] = []
    model.embedding.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model.cfg.word_dropout = 0.5
    model(torch.full((2, 40), 5).masked_fill(torch.arange(40) >= 20, 0), torch.tensor([20, 20]))
    got = seen[-1]
    assert (got[:, 20:] == 0).all()
    assert 0.2 < (got[:, :20] == UNK_ID).float().mean() < 0.8


# --------------------------------------------------------------------------- model.ngrams


def test_ngram_ids_hold_each_ngram_once_and_never_padding() -> None:
    from seqtrain.model import ngram_ids

    ids = torch.tensor([[3, 4, 3, 4, 0, 0], [5, 6, 7, 0, 0, 0]])
    lengths = torch.tensor([4, 3])
    features = ngram_ids(ids, lengths, n=2, vocab_size=10, buckets=1000)  # (B, F)
    rows = [sorted(f for f in row.tolist() if f != 0) for row in features]
    # text 0: unigrams 3, 4 and bigrams (3, 4), (4, 3), each once; (4, pad) is not a bigram
    assert rows[0][:2] == [3, 4] and len(rows[0]) == 4 and all(10 <= f < 1010 for f in rows[0][2:])
    assert rows[1][:3] == [5, 6, 7] and len(rows[1]) == 5
    # the same text with more padding after it has the same features
    wider = ngram_ids(torch.cat([ids, torch.zeros(2, 9, dtype=torch.long)], 1), lengths, 2, 10, 1000)
    assert [sorted(f for f in row.tolist() if f) for row in wider] == rows
    # trigrams add (3, 4, 3) and (4, 3, 4); unigrams alone are the token ids
    assert len([f for f in ngram_ids(ids, lengths, 3, 10, 1000)[0].tolist() if f]) == 6
    assert sorted(f for f in ngram_ids(ids, lengths, 1, 10, 1000)[1].tolist() if f) == [5, 6, 7]


def ngram_model(**changes: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(cell="gru", embedding_dim=8, hidden_size=8, dropout=0.0, ngrams=2, ngram_buckets=64)
    for key, value in changes.items():
        setattr(cfg, key, value)
    model = build_model(cfg, vocab_size=20, num_classes=3)
    with torch.no_grad():
        model.ngram_weights.weight[1:].normal_()  # type: ignore[union-attr]
    return model


def test_the_ngram_path_is_averaged_in_and_trained_on_its_own_loss() -> None:
    from seqtrain.model import ngram_logits

    model = ngram_model()
    ids, lengths = torch.randint(2, 20, (4, 7)), torch.tensor([7, 5, 3, 1])
    deep = model.head(model.pool(model.encode(ids, lengths), lengths))  # (B, C)
    wide = ngram_logits(model.ngram_weights, ids, lengths, model.cfg)  # (B, C)
    assert wide.abs().sum() > 0
    assert torch.allclose(model.eval()(ids, lengths), (deep + wide) / 2, atol=1e-6)
    # training: the recurrent path's output is returned, the n-gram path's kept for its own loss, and
    # each loss reaches only its own path's weights
    model.train()
    out = model(ids, lengths)
    assert torch.allclose(out, deep, atol=1e-6) and torch.allclose(model.wide_output, wide, atol=1e-6)
    F.cross_entropy(out, torch.tensor([0, 1, 2, 0])).backward(retain_graph=True)
    assert model.ngram_weights.weight.grad is None and model.head.weight.grad is not None
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model.wide_output, torch.tensor([0, 1, 2, 0])).backward()
    assert model.head.weight.grad is None and model.ngram_weights.weight.grad.abs().sum() > 0
    assert float(model.ngram_weights.weight.grad[0].abs().sum()) == 0.0  # the padding row stays zero


@pytest.mark.parametrize("truncation", ["head", "tail", "head+tail"])
def test_the_recurrent_path_reads_what_encode_keeps_when_the_ngram_path_reads_further(
    truncation: str,
) -> None:
    """data.ngram_max_length: the model cuts the recurrent path's max_length tokens from the longer ids as
    encoding.encode would have cut them, the n-gram path reads all of them, and an adversarial delta
    on the embeddings is cut the same way."""
    from seqtrain.config import DataConfig
    from seqtrain.encoding import encode, pad
    from seqtrain.model import ngram_logits

    class Words:  # the two calls of a tokenizer that encode makes
        def encode_batch_fast(self, texts: list[str], add_special_tokens: bool) -> list[object]:
            return [SimpleNamespace(ids=[int(w) for w in t.split()]) for t in texts]

    max_length, lengths_of = 5, [12, 5, 9, 1, 6]
    generator = torch.Generator().manual_seed(1)
    texts = [
        " ".join(str(int(i)) for i in torch.randint(2, 20, (n,), generator=generator)) for n in lengths_of
    ]
    narrow = DataConfig(max_length=max_length, truncation=truncation)  # type: ignore[arg-type]
    wide = DataConfig(max_length=max_length, truncation=truncation, ngram_max_length=16)  # type: ignore[arg-type]
    full_ids, full_lengths = (torch.from_numpy(a) for a in pad(encode(Words(), texts, wide)))  # type: ignore[arg-type]
    cut_ids, cut_lengths = (torch.from_numpy(a) for a in pad(encode(Words(), texts, narrow)))  # type: ignore[arg-type]
    assert full_lengths.tolist() == lengths_of and cut_lengths.tolist() == [5, 5, 5, 1, 5]

    torch.manual_seed(0)
    cfg = ModelConfig(
        cell="lstm",
        bidirectional=True,
        pooling="max",
        embedding_dim=8,
        hidden_size=8,
        dropout=0.0,
        ngrams=2,
        ngram_buckets=64,
    )
    model = build_model(cfg, vocab_size=20, num_classes=2, data=wide)
    plain = build_model(cfg, vocab_size=20, num_classes=2, data=narrow)
    plain.load_state_dict(model.state_dict())
    # training mode returns the recurrent path alone: the same as a model given the cut ids
    delta = torch.randn(*full_ids.shape, 8, generator=generator)  # (B, T, E)
    cut_delta = torch.zeros(5, cut_ids.shape[1], 8)
    for row, n in enumerate(lengths_of):
        positions = encode(Words(), [" ".join(map(str, range(n)))], narrow)[0]  # which positions survive
        cut_delta[row, : len(positions)] = delta[row, positions]
    with torch.no_grad():  # an n-gram path that adds something, so that which ids it reads shows
        model.ngram_weights.weight[1:].normal_(generator=generator)  # type: ignore[union-attr]
        plain.ngram_weights.weight.copy_(model.ngram_weights.weight)  # type: ignore[union-attr]
    model.train(), plain.train()
    assert torch.allclose(
        model(full_ids, full_lengths, delta), plain(cut_ids, cut_lengths, cut_delta), atol=1e-6
    )
    # the n-gram path saw the whole text, not the cut one
    wide_full = ngram_logits(model.ngram_weights, full_ids, full_lengths, cfg)  # (B, C)
    wide_cut = ngram_logits(model.ngram_weights, cut_ids, cut_lengths, cfg)
    assert torch.allclose(model.wide_output, wide_full) and not torch.allclose(wide_full, wide_cut)
    # and evaluation averages the recurrent path on the cut ids with the n-gram path on all of them
    model.eval(), plain.eval()
    deep = plain.head(plain.pool(plain.encode(cut_ids, cut_lengths), cut_lengths))
    assert torch.allclose(model(full_ids, full_lengths), (deep + wide_full) / 2, atol=1e-6)


def test_naive_bayes_ratios_rank_the_ngrams_that_tell_the_classes_apart() -> None:
    from seqtrain.model import naive_bayes_scale, ngram_logits

    cfg = ModelConfig(cell="gru", embedding_dim=8, hidden_size=8, ngrams=1, ngram_buckets=4)
    # token 5 only in class-1 texts, token 6 only in class 0, token 7 in every text
    ids = torch.tensor([[5, 7, 0], [5, 7, 5], [6, 7, 0], [6, 7, 0]])
    batches = [{"ids": ids, "lengths": torch.tensor([2, 3, 2, 2]), "labels": torch.tensor([1, 1, 0, 0])}]
    scale, texts = naive_bayes_scale(batches, cfg, vocab_size=10, num_classes=2)  # (V + buckets, C)
    assert texts == 4 and scale.shape == (14, 2)
    assert torch.equal(scale[:, 0], scale[:, 1])  # two classes: one ratio, both columns
    assert scale[5, 1] > scale[7, 1] and scale[6, 1] > scale[7, 1]
    assert float(scale[7, 1]) < 1e-6 and float(scale[PAD_ID].abs().sum()) == 0.0
    # presence, not counts: token 5 twice in a text counts once, so 5 and 6 weigh the same
    assert torch.allclose(scale[5], scale[6])
    # the scale multiplies each feature's weights; all ones changes nothing
    model = ngram_model(ngram_weighting="nb")
    assert model.ngram_scale is not None and model.ngram_scale.shape == (20 + 64, 3)
    x, lengths = torch.randint(2, 20, (4, 7)), torch.tensor([7, 5, 3, 1])
    plain = ngram_logits(model.ngram_weights, x, lengths, model.cfg)
    assert torch.allclose(ngram_logits(model.ngram_weights, x, lengths, model.cfg, model.ngram_scale), plain)
    with torch.no_grad():
        model.ngram_scale[:20] *= 2.0  # unigrams count double: logits change, and the model uses it
    assert not torch.allclose(model.eval()(x, lengths), ngram_model().eval()(x, lengths))
    assert "ngram_scale" in model.state_dict() and "ngram_scale" not in ngram_model().state_dict()


def test_a_bounded_regression_averages_two_scores_in_0_1() -> None:
    model = ngram_model(task="regression", bounded=True)
    model = build_model(model.cfg, vocab_size=20, num_classes=1)
    with torch.no_grad():
        model.ngram_weights.weight.normal_(0, 5.0)  # type: ignore[union-attr]
    scores = model.eval()(torch.randint(2, 20, (6, 5)), torch.tensor([5, 4, 3, 2, 1, 5]))
    assert scores.shape == (6, 1) and bool(((scores > 0) & (scores < 1)).all())


def test_ngram_logits_do_not_depend_on_the_batch() -> None:
    model = ngram_model().eval()
    short = torch.randint(2, 20, (1, 4))
    batch = torch.zeros(3, 12, dtype=torch.long)
    batch[:2] = torch.randint(2, 20, (2, 12))
    batch[2, :4] = short
    with torch.no_grad():
        alone = model(short, torch.tensor([4]))
        inside = model(batch, torch.tensor([12, 9, 4]))[2:]
    assert torch.allclose(alone, inside, atol=1e-5)
