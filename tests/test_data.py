from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from seqtrain.data import BatchStream, build_vocab, make_loader, pad, sorted_batches
from seqtrain.encoding import PAD_ID, UNK_ID, BatchCost, encode
from seqtrain.errors import DataError
from tests.conftest import synthetic_rows, tiny_config, write_hub_folder


def batches(
    cfg: Any,
    vocab: Any,
    epoch: int = 0,
    resume: dict[str, Any] | None = None,
    workers: int = 0,
    offset: int = 0,
) -> list[dict[str, Any]]:
    stream = BatchStream(
        cfg.data,
        "train",
        vocab.tokenizer,
        vocab.labels,
        cfg.train.batch_size,
        shuffle=True,
        seed=cfg.seed,
        epoch=epoch,
        resume=resume,
        slot_offset=offset,
    )
    return list(make_loader(stream, workers))


def test_batches_cover_every_row_once_bucketed_and_counted(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", data={"chunk_size": 300})
    vocab = build_vocab(cfg)
    assert vocab.num_examples == 600
    got = batches(cfg, vocab)
    assert len(got) == sum(-(-n // cfg.train.batch_size) for n in vocab.chunk_rows), (
        "steps per epoch are exact"
    )
    assert sum(len(b["labels"]) for b in got) == 600
    real = sum(int(b["lengths"].sum()) for b in got)
    padded = sum(b["ids"].numel() for b in got)
    assert 1 - real / padded < 0.05, "sorting a chunk by length leaves little padding"
    for b in got:  # right padding, lengths exact
        for row, n in zip(b["ids"], b["lengths"], strict=True):
            assert (row[:n] != PAD_ID).all() and (row[n:] == PAD_ID).all()


def test_batch_order_is_random_but_seeded(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run")
    vocab = build_vocab(cfg)
    first = [b["lengths"].tolist() for b in batches(cfg, vocab, epoch=0)]
    again = [b["lengths"].tolist() for b in batches(cfg, vocab, epoch=0)]
    other = [b["lengths"].tolist() for b in batches(cfg, vocab, epoch=1)]
    assert first == again
    assert first != other
    maxes = [max(x) for x in first]
    assert maxes != sorted(maxes) and maxes != sorted(maxes, reverse=True), (
        "batches are not served in length order"
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_any_batch_continues_exactly(tiny_data: Path, tmp_path: Path, workers: int) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", data={"num_workers": workers})
    vocab = build_vocab(cfg)
    full = batches(cfg, vocab, workers=workers)
    for k in (1, 5, len(full) // 2, len(full) - 1):
        positions = {}
        for b in full[:k]:
            positions[str(b["position"]["slot"])] = b["position"]
        offset = (full[k - 1]["position"]["slot"] + 1) % max(1, workers)
        rest = batches(cfg, vocab, resume=json.loads(json.dumps(positions)), workers=workers, offset=offset)
        assert [b["ids"].tolist() for b in rest] == [b["ids"].tolist() for b in full[k:]], (
            f"resume after batch {k}"
        )


def test_truncation_head_tail_and_both(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run")
    vocab = build_vocab(cfg)
    text = " ".join(["great"] * 10 + ["the"] * 100 + ["awful"] * 10)
    tok = vocab.tokenizer
    great, awful = tok.token_to_id("great"), tok.token_to_id("awful")
    for mode, first, last in (
        ("head", great, tok.token_to_id("the")),
        ("tail", tok.token_to_id("the"), awful),
        ("head+tail", great, awful),
    ):
        data = type(cfg.data)(**{**cfg.data.__dict__, "max_length": 20, "truncation": mode})
        ids = encode(tok, [text], data)[0]
        assert len(ids) == 20 and ids[0] == first and ids[-1] == last, mode


def test_huge_text_is_clipped_before_tokenizing(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run")
    vocab = build_vocab(cfg)
    ids = encode(vocab.tokenizer, ["great " * 2_000_000], cfg.data)[0]  # 12 million characters
    assert len(ids) == cfg.data.max_length


def test_empty_text_encodes_to_unk() -> None:
    from seqtrain.config import TokenizerConfig
    from seqtrain.data import new_tokenizer

    tok, trainer = new_tokenizer(TokenizerConfig(min_frequency=1))
    tok.train_from_iterator(["a b c"], trainer=trainer)
    from seqtrain.config import DataConfig

    assert encode(tok, ["   "], DataConfig())[0] == [UNK_ID]


def test_string_labels_are_discovered_sorted(tmp_path: Path) -> None:
    data = write_hub_folder(
        tmp_path / "s",
        {
            "train": synthetic_rows(100, 0, string_labels=True),
            "validation": synthetic_rows(20, 1, string_labels=True),
        },
    )
    cfg = tiny_config(data, tmp_path / "run")
    vocab = build_vocab(cfg)
    assert vocab.labels.names == ["neg", "pos"]
    got = batches(cfg, vocab)
    assert set(torch.cat([b["labels"] for b in got]).tolist()) == {0, 1}


def test_label_names_for_integer_labels_and_out_of_range(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", data={"label_names": ["negative", "positive"]})
    assert build_vocab(cfg).labels.names == ["negative", "positive"]
    rows = synthetic_rows(40, 0)
    rows[5]["label"] = 2  # a third class where label_names names two
    three = write_hub_folder(tmp_path / "three", {"train": rows})
    cfg = tiny_config(three, tmp_path / "run", data={"label_names": ["negative", "positive"]})
    with pytest.raises(DataError, match="row 5: unknown label 2"):
        build_vocab(cfg)
    cfg = tiny_config(
        three, tmp_path / "run", data={"label_names": ["negative", "positive"], "on_bad_rows": "skip"}
    )
    assert dict(build_vocab(cfg).bad_rows) == {"unknown label": 1}


def test_missing_column_lists_existing_columns(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", data={"text_column": "review"})
    with pytest.raises(DataError) as e:
        build_vocab(cfg)
    assert "'review'" in str(e.value) and "text, label" in str(e.value) and "data.text_column" in str(e.value)


def test_missing_split_and_missing_path(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", data={"train_split": "nope"})
    with pytest.raises(DataError, match="nope"):
        build_vocab(cfg)
    cfg = tiny_config(tmp_path / "missing", tmp_path / "run")
    with pytest.raises(DataError, match="does not exist"):
        build_vocab(cfg)


def test_bad_rows_error_names_row_or_are_skipped_and_counted(tmp_path: Path) -> None:
    rows = synthetic_rows(50, 0)
    rows[7]["text"] = "   "
    rows[9]["label"] = None
    data = write_hub_folder(tmp_path / "bad", {"train": rows, "validation": synthetic_rows(10, 1)})
    with pytest.raises(DataError, match="row 7: empty text"):
        build_vocab(tiny_config(data, tmp_path / "run"))
    cfg = tiny_config(data, tmp_path / "run", data={"on_bad_rows": "skip"})
    vocab = build_vocab(cfg)
    assert vocab.num_examples == 48 and dict(vocab.bad_rows) == {"empty text": 1, "null label": 1}
    got = batches(cfg, vocab)
    assert sum(len(b["labels"]) for b in got) == 48
    assert got[-1]["position"]["bad_rows"] == {"empty text": 1, "null label": 1}


def test_data_files_csv_and_jsonl(tmp_path: Path) -> None:
    rows = synthetic_rows(80, 0)
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    jsonl = tmp_path / "val.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(20, 1)))
    cfg = tiny_config(csv_path, tmp_path / "run", data={"eval_path": str(jsonl)})
    vocab = build_vocab(cfg)
    assert vocab.num_examples == 80
    ev = list(BatchStream(cfg.data, "validation", vocab.tokenizer, vocab.labels, 8, shuffle=False))
    assert sum(len(b["labels"]) for b in ev) == 20


def test_sorted_batches_restore_order() -> None:
    seqs = [[2] * n for n in (5, 1, 9, 3, 7)]
    seen = {}
    for idx, ids, lengths in sorted_batches(seqs, 2):
        for i, row, n in zip(idx, ids, lengths, strict=True):
            seen[int(i)] = row[:n].tolist()
    assert [seen[i] for i in range(5)] == seqs


def test_batch_cost_cuts_where_smaller_batches_cost_less() -> None:
    """BatchCost.split against every way of cutting a few sorted lengths into consecutive groups."""
    import itertools

    def total(cost: BatchCost, lengths: np.ndarray, groups: list[slice]) -> float:
        return sum(cost.per_call + lengths[g][-1] * (cost.per_step + len(lengths[g])) for g in groups)

    rng = np.random.default_rng(0)
    for trial in range(40):
        lengths = np.sort(rng.integers(1, 60, size=int(rng.integers(1, 9))))
        cost = BatchCost(per_call=float(rng.uniform(0, 80)), per_step=float(rng.uniform(0, 10)))
        n = len(lengths)
        brute = min(
            total(cost, lengths, [slice(a, b) for a, b in itertools.pairwise((0, *cuts, n))])
            for k in range(n)
            for cuts in itertools.combinations(range(1, n), k)
        )
        groups = cost.split(lengths)
        assert groups[0].start == 0 and groups[-1].stop == n
        assert all(a.stop == b.start for a, b in itertools.pairwise(groups))
        assert total(cost, lengths, groups) == pytest.approx(brute), (trial, lengths, cost)
    # a call that costs more than any padding: one batch; no cost per call: one batch per length
    lengths = np.array([1, 1, 5, 9, 9])
    assert BatchCost(per_call=1e6, per_step=0).split(lengths) == [slice(0, 5)]
    assert BatchCost(per_call=0, per_step=0).split(lengths) == [slice(0, 2), slice(2, 3), slice(3, 5)]


def test_sorted_batches_with_a_cost_restore_order_and_keep_the_batch_size() -> None:
    seqs = [[2] * n for n in (5, 1, 30, 1, 7, 1, 30, 2)]
    seen = {}
    batches = list(sorted_batches(seqs, 4, BatchCost(per_call=2, per_step=1)))
    for idx, ids, lengths in batches:
        assert len(idx) <= 4 and ids.shape[1] == int(lengths.max())
        for i, row, n in zip(idx, ids, lengths, strict=True):
            seen[int(i)] = row[:n].tolist()
    assert [seen[i] for i in range(len(seqs))] == seqs
    assert [len(idx) for idx, _, _ in batches] == [4, 2, 2]  # (1, 1, 1, 2), then (5, 7) and (30, 30)


def test_pad_shapes() -> None:
    ids, lengths = pad([[3, 4, 5], [6]])
    assert ids.tolist() == [[3, 4, 5], [6, 0, 0]] and lengths.tolist() == [3, 1]


def test_vocab_is_built_from_a_capped_sample(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        tiny_data, tmp_path / "run", tokenizer={"max_examples": 10, "vocab_size": 500, "min_frequency": 1}
    )
    vocab = build_vocab(cfg)
    assert vocab.num_examples == 600  # every row is still counted for the schedule
    assert (
        vocab.tokenizer.get_vocab_size()
        < build_vocab(tiny_config(tiny_data, tmp_path / "r2")).tokenizer.get_vocab_size()
    )


def test_bpe_tokenizer_has_fewer_unknowns(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        tiny_data, tmp_path / "run", tokenizer={"kind": "bpe", "vocab_size": 300, "min_frequency": 1}
    )
    vocab = build_vocab(cfg)
    ids = encode(vocab.tokenizer, ["wonderfullest greatness"], cfg.data)[0]
    assert UNK_ID not in ids and len(ids) >= 2


def test_unlabeled_texts_are_never_split_by_data_validation_split(tmp_path: Path) -> None:
    """data.validation_split holds out rows of the labelled training split only: every row of pretrain.path
    reaches pretraining and train.vat_eps. Catches a source that copies data's settings with its split."""
    from seqtrain.config import from_dict
    from seqtrain.data import open_split, unlabeled_source
    from tests.conftest import synthetic_rows, write_hub_folder

    unlabeled = write_hub_folder(
        tmp_path / "u", {"train": [{"text": r["text"]} for r in synthetic_rows(200, 3)]}
    )
    cfg = from_dict(
        {
            "data": {"path": str(tmp_path / "labelled"), "validation_split": 0.3},
            "pretrain": {"path": str(unlabeled)},
        }
    )
    source = unlabeled_source(cfg)
    assert sum(1 for _ in open_split(source, source.train_split)) == 200
