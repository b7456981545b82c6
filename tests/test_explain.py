"""`seqtrain explain`: offsets, the two methods checked against what they claim, outputs, faithfulness.

One small model is trained once, for seconds, on a real slice of SST-2 (../shared/data or data/),
so attributions are checked on the kind of text and model they are meant for.
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from typer.testing import CliRunner

from seqtrain.cli import app
from seqtrain.encoding import UNK_ID, encode
from seqtrain.explain import (
    deletion_drops,
    encode_with_offsets,
    explain_texts,
    integrated_gradients,
    spearman,
    top_words,
)
from seqtrain.inference.run import Run, load_run
from tests.conftest import REAL_DATA, tiny_config

pytestmark = pytest.mark.skipif(
    not (REAL_DATA / "sst2").is_dir(), reason="needs ../shared/data/sst2 or data/sst2"
)
runner = CliRunner()
Truncation = Literal["head", "tail", "head+tail"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from seqtrain.train import train

    tmp = tmp_path_factory.mktemp("explain")
    cfg = tiny_config(
        REAL_DATA / "sst2",
        tmp / "run",
        data={
            "text_column": "sentence",
            "label_names": ["negative", "positive"],
            "max_train_examples": 6000,
            "max_eval_examples": 500,
            "max_length": 48,
        },
        tokenizer={"vocab_size": 4000, "min_frequency": 2},
        model={
            "cell": "gru",
            "embedding_dim": 32,
            "hidden_size": 32,
            "bidirectional": True,
            "pooling": "max",
        },
        train={"batch_size": 32, "epochs": 2, "lr": 0.01, "eval_every": 0},
    )
    report = train(cfg)
    assert report["accuracy"] > 0.7, report["accuracy"]  # it learnt something worth explaining
    return tmp / "run"


@pytest.fixture(scope="module")
def run(run_dir: Path) -> Run:
    return load_run(run_dir)[0]


@pytest.fixture(scope="module")
def validation(run: Run) -> list[str]:
    """The first 300 validation phrases of 4 or more tokens."""
    from seqtrain.data import open_split

    texts = [row["sentence"] for row in open_split(run.config.data, "validation").take(1000)]
    return [
        t for t, s in zip(texts, encode(run.tokenizer, texts, run.config.data), strict=True) if len(s) >= 4
    ][:300]


TRICKY = [
    # multibyte, collapsed whitespace, NFKC, HTML break
    "Naïve   café\tfilm — it’s ﬁne!<br />Really  GREAT 🎬 ",
    "  leading and trailing spaces  ",
    "a",
]


@pytest.mark.parametrize("truncation", ["head", "tail", "head+tail"])
def test_offsets_slice_the_original_text_back_to_each_token(run: Run, truncation: Truncation) -> None:
    """Every kept token's offsets select its own characters in the input, and the ids are what the model
    reads (encoding.encode), also when the text is clipped and truncated (a shifted tail would fail)."""
    long = " ".join(f"wörd{i} très   good" for i in range(80))  # > max_length * 32 characters: clipped first
    for data in (
        run.config.data,
        dataclasses.replace(run.config.data, max_length=6, truncation=truncation),
        # data.ngram_max_length: the tokens the model reads reach further than max_length
        dataclasses.replace(run.config.data, max_length=2, ngram_max_length=6, truncation=truncation),
    ):
        texts = [*TRICKY, long]
        encoded = encode_with_offsets(run.tokenizer, texts, data)
        assert [e.ids for e in encoded] == encode(run.tokenizer, texts, data)
        assert max(len(e.ids) for e in encoded) == (data.ngram_max_length or data.max_length)
        for text, e in zip(texts, encoded, strict=True):
            assert len(e.spans) == len(e.ids)
            pieces = [text[a:b] for a, b in e.spans]
            tokens = [run.tokenizer.id_to_token(i) for i in e.ids]
            for piece, token in zip(pieces, tokens, strict=True):
                # the vocabulary holds the normalised form (NFKC, lower case); <unk> covers anything unseen
                assert token == "<unk>" or token == piece.replace("ﬁ", "fi").lower(), (piece, token)
            assert all(p and not p.isspace() for p in pieces)
    ends = ["wörd78", "très", "good", "wörd79", "très", "good"]
    cases: list[tuple[Truncation, list[str]]] = [
        ("tail", ends),
        ("head+tail", ["wörd0", "très", "good", *ends[3:]]),
    ]
    for mode, kept in cases:
        e = encode_with_offsets(
            run.tokenizer, [long], dataclasses.replace(run.config.data, max_length=6, truncation=mode)
        )[0]
        assert [long[a:b] for a, b in e.spans] == kept
        assert e.spans[-1][1] == len(long)


def test_occlusion_score_is_the_probability_drop_measured_by_hand(run: Run, validation: list[str]) -> None:
    """By default a token's score is the drop when it is removed; with occlusion_mode="unk", when it
    becomes <unk>."""
    texts = validation[:20]
    explained = explain_texts(run, texts)
    other = explain_texts(run, texts, label=0)  # explain "negative" whatever was predicted
    unknown = explain_texts(run, texts, occlusion_mode="unk")
    for text, ex, ex0, exu in zip(texts, explained, other, unknown, strict=True):
        ids = encode(run.tokenizer, [text], run.config.data)[0]
        j = len(ids) // 2
        before, after, after_unk = run.probs(
            [ids, [*ids[:j], *ids[j + 1 :]], [*ids[:j], UNK_ID, *ids[j + 1 :]]], 1
        )
        c = int(before.argmax())
        assert ex.target == c and ex.scores[j] == pytest.approx(before[c] - after[c], abs=1e-6)
        assert ex0.target == 0 and ex0.scores[j] == pytest.approx(before[0] - after[0], abs=1e-6)
        assert exu.target == c and exu.scores[j] == pytest.approx(before[c] - after_unk[c], abs=1e-6)
        np.testing.assert_allclose(ex.probs, before, atol=1e-6)
    one = explain_texts(run, ["great"])[0]  # a text of one token: removing it leaves an empty text's <unk>
    before, empty = run.probs([one.encoded.ids, [UNK_ID]], 1)
    assert one.scores[0] == pytest.approx(before[one.target] - empty[one.target], abs=1e-6)


def test_occlusion_ranks_first_the_token_whose_removal_drops_most(run: Run, validation: list[str]) -> None:
    """Occlusion by removal makes the deletion test's first step: its top token's drop at k = 1 is the
    largest single-token drop there is, as the oracle's."""
    from bench.explain import oracle_scores

    explained = explain_texts(run, validation[:40])
    encoded, targets = [ex.encoded for ex in explained], [ex.target for ex in explained]
    first = deletion_drops(run, encoded, [ex.scores for ex in explained], targets, k_max=1)[:, 0]
    np.testing.assert_allclose(first, [ex.scores.max() for ex in explained], atol=1e-6)
    best = deletion_drops(run, encoded, oracle_scores(run, encoded, targets, k_max=1), targets, k_max=1)
    np.testing.assert_allclose(first, best[:, 0], atol=1e-6)


def short_phrases(run: Run, lo: int, hi: int, n: int) -> list[str]:
    """The first n validation phrases of lo to hi tokens."""
    from seqtrain.data import open_split

    texts = [row["sentence"] for row in open_split(run.config.data, "validation").take(2000)]
    lengths = [len(s) for s in encode(run.tokenizer, texts, run.config.data)]
    return [t for t, k in zip(texts, lengths, strict=True) if lo <= k <= hi][:n]


def test_oracle_is_the_best_deletion_order(run: Run, validation: list[str]) -> None:
    """On phrases short enough to try every order of their tokens, the oracle's AOPC@10 is the largest of
    all; no method, nor random, goes above it; on longer texts the greedy search is at most the exact one."""
    from itertools import permutations

    from bench.explain import oracle_scores

    texts = short_phrases(run, 2, 5, 12)
    explained = explain_texts(run, texts)
    encoded, targets = [ex.encoded for ex in explained], [ex.target for ex in explained]
    oracle = deletion_drops(run, encoded, oracle_scores(run, encoded, targets), targets).mean(1)
    for i, e in enumerate(encoded):
        n = len(e.spans)
        orders = [np.argsort(order).astype(np.float64) * -1 for order in permutations(range(n))]
        every = deletion_drops(run, [e] * len(orders), orders, [targets[i]] * len(orders)).mean(1)
        assert oracle[i] == pytest.approx(every.max(), abs=1e-6), (texts[i], oracle[i], every.max())
    rng = np.random.default_rng(0)
    longer = [ex for ex in explain_texts(run, validation[:60]) if len(ex.encoded.spans) <= 10]
    assert len(longer) > 10
    encoded, targets = [ex.encoded for ex in longer], [ex.target for ex in longer]
    exact = deletion_drops(run, encoded, oracle_scores(run, encoded, targets), targets).mean(1)
    greedy = deletion_drops(run, encoded, oracle_scores(run, encoded, targets, exhaustive=0), targets).mean(1)
    assert (greedy <= exact + 1e-6).all() and exact.mean() > 0.2
    for method in ("occlusion", "integrated-gradients"):
        scores = [ex.scores for ex in explain_texts(run, [ex.text for ex in longer], method)]
        assert (deletion_drops(run, encoded, scores, targets).mean(1) <= exact + 1e-6).all(), method
    noise = [rng.random(len(e.ids)) for e in encoded]
    assert (deletion_drops(run, encoded, noise, targets).mean(1) <= exact + 1e-6).all()


def test_aopc_by_length_and_normalised() -> None:
    """The table's AOPC: over k = 1..10, or over k = 1..min(10, n - 1) per text, leaving out texts of one
    token."""
    from bench.explain import aopc

    drops = np.tile(np.arange(1, 11, dtype=np.float64), (3, 1))  # drop k at k
    lengths = np.array([1, 4, 20])
    every = np.ones(3, bool)
    assert aopc(drops, lengths, every) == pytest.approx(5.5)
    assert aopc(drops, lengths, every, normalised=True) == pytest.approx((2.0 + 5.5) / 2)
    assert aopc(drops, lengths, lengths > 10) == pytest.approx(5.5)
    assert np.isnan(aopc(drops, lengths, lengths > 30))


def test_integrated_gradients_are_complete(run: Run, validation: list[str]) -> None:
    """Scores sum to f(text) - f(baseline), with f(text) the model's probability: the gradient path is
    right."""
    texts = validation[:40]
    encoded = encode_with_offsets(run.tokenizer, texts, run.config.data)
    probs = run.probs([e.ids for e in encoded], 64)
    targets = [int(p.argmax()) for p in probs]
    for baseline in ("unk", "zero"):
        scores, ends = integrated_gradients(
            run, encoded, targets, steps=64, baseline=baseline, max_tokens=2000
        )
        np.testing.assert_allclose(ends[:, 0], probs[np.arange(len(texts)), targets], atol=1e-5)
        gaps = np.array([s.sum() for s in scores]) - (ends[:, 0] - ends[:, 1])
        assert np.abs(gaps).max() < 0.02, (baseline, np.abs(gaps).max())
        assert (
            np.abs(ends[:, 0] - ends[:, 1]).mean() > 0.1
        )  # not trivially complete: the baseline changes the output
    # the <unk> baseline is the all-unknown text of the same length
    all_unk = run.probs([[UNK_ID] * len(e.ids) for e in encoded], 64)
    unk_ends = integrated_gradients(run, encoded, targets, steps=8)[1]
    np.testing.assert_allclose(unk_ends[:, 1], all_unk[np.arange(len(texts)), targets], atol=1e-5)


@pytest.mark.parametrize("method", ["occlusion", "integrated-gradients"])
def test_removing_the_most_attributed_word_moves_the_prediction_more(
    run: Run, validation: list[str], method: str
) -> None:
    """On confidently classified texts, removing the top-scored word lowers the predicted class's
    probability more than removing the lowest-scored one."""
    explained = [ex for ex in explain_texts(run, validation[:150], method) if ex.probs.max() > 0.8]
    assert len(explained) > 50
    top = deletion_drops(
        run,
        [ex.encoded for ex in explained],
        [ex.scores for ex in explained],
        [ex.target for ex in explained],
        k_max=1,
    )[:, 0]
    bottom = deletion_drops(
        run,
        [ex.encoded for ex in explained],
        [-ex.scores for ex in explained],
        [ex.target for ex in explained],
        k_max=1,
    )[:, 0]
    assert top.mean() > bottom.mean() + 0.05 and (top > bottom).mean() > 0.7, (top.mean(), bottom.mean())


def test_aopc_of_both_methods_beats_random_tokens(run: Run, validation: list[str]) -> None:
    rng = np.random.default_rng(0)
    aopc = {}
    for method in ("occlusion", "integrated-gradients"):
        explained = explain_texts(run, validation[:200], method)
        encoded, targets = [ex.encoded for ex in explained], [ex.target for ex in explained]
        aopc[method] = deletion_drops(run, encoded, [ex.scores for ex in explained], targets).mean()
    aopc["random"] = deletion_drops(run, encoded, [rng.random(len(e.ids)) for e in encoded], targets).mean()
    assert aopc["occlusion"] > 2 * aopc["random"] and aopc["integrated-gradients"] > 2 * aopc["random"], aopc


def test_spearman() -> None:
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 2, 2, 3]), np.array([1.0, 3, 2, 4])) == pytest.approx(0.9486833, abs=1e-6)


def explain_cli(*args: str) -> list[dict]:
    result = runner.invoke(app, ["explain", *args, "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_jsonl_rows_follow_the_input_lines_and_bad_lines_are_reported(run_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    lines = [
        '{"text": "a gorgeous, witty film", "id": 7}',
        "not json",
        '{"text": "  "}',
        '{"text": "dull and far too long", "id": 9}',
        '{"text": "<unseen> ☃ words"}',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = runner.invoke(app, ["explain", str(run_dir), "--input", str(path), "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in rows] == [
        "a gorgeous, witty film",
        "dull and far too long",
        "<unseen> ☃ words",
    ]
    assert [r.get("id") for r in rows] == [7, 9, None]
    assert "line 2" in result.stderr and "line 3" in result.stderr and "texts/s" in result.stderr
    for r in rows:
        assert r["explained"] == r["label"] and set(r["probs"]) == {"negative", "positive"}
        assert [t["text"] for t in r["tokens"]] == [r["text"][t["start"] : t["end"]] for t in r["tokens"]]
    assert rows[1]["tokens"][0] == {
        "text": "dull",
        "start": 0,
        "end": 4,
        "score": rows[1]["tokens"][0]["score"],
    }
    # .txt keeps one output line per input line, as predict does: a blank line is an empty text, reported
    txt = tmp_path / "in.txt"
    txt.write_bytes(b"a gorgeous film\n\n\xff bad bytes\nawful\n")
    result = runner.invoke(app, ["explain", str(run_dir), "--input", str(txt), "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["text"], len(r["tokens"])) for r in rows] == [("a gorgeous film", 3), ("", 0), ("awful", 1)]
    assert "blank input line(s) 2" in result.stderr and "line 3: not valid UTF-8" in result.stderr


def test_label_and_method_choices(run_dir: Path) -> None:
    rows = explain_cli(
        str(run_dir), "a gorgeous film", "--label", "negative", "--method", "integrated-gradients"
    )
    assert rows[0]["label"] == "positive" and rows[0]["explained"] == "negative"
    result = runner.invoke(app, ["explain", str(run_dir), "a film", "--label", "neutral"])
    assert result.exit_code == 2 and "not one of the run's labels" in result.output
    result = runner.invoke(app, ["explain", str(run_dir), "a film", "--method", "shap"])
    assert result.exit_code == 2 and "--method" in result.output
    result = runner.invoke(app, ["explain", str(run_dir)])
    assert result.exit_code == 2
    result = runner.invoke(
        app, ["explain", str(run_dir), "a film", "--output", str(run_dir / "missing" / "x.html")]
    )
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output


def test_html_is_one_escaped_page(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.html"
    attack = 'great <script>alert("x")</script> & <b>bold</b> film'
    result = runner.invoke(
        app, ["explain", str(run_dir), attack, "a dull film", "--format", "html", "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page and "<b>" not in page
    assert page.count('class="ex"') == 2
    shown = re.findall(r'<div class="text">(.*?)</div>', page)
    # without the highlighting spans, the page shows exactly the input, as text
    assert [html.unescape(re.sub(r"<span [^>]*>|</span>", "", s)) for s in shown] == [attack, "a dull film"]
    assert 'title="+' in page or 'title="-' in page  # tokens carry their scores


def test_terminal_format_prints_each_text_with_its_label(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from seqtrain import console

    result = runner.invoke(
        app, ["explain", str(run_dir), "a gorgeous film [red]", "a dull , boring and awful mess"]
    )
    assert result.exit_code == 0, result.output
    assert "a gorgeous film [red]" in result.stdout and "a dull , boring and awful mess" in result.stdout
    assert "positive (" in result.stdout and "negative (" in result.stdout
    # on a colour terminal, the strongest token is highlighted and markup in the text stays text
    monkeypatch.setattr(
        console, "out", Console(file=io.StringIO(), force_terminal=True, color_system="truecolor")
    )
    console.print_attributions(
        "so [bold]good[/bold] ok", [(0, 2, 0.01), (9, 13, -0.9), (21, 23, 0.3)], "head"
    )
    shown = console.out.file.getvalue()  # type: ignore[attr-defined]
    assert "[bold]" in shown and "\x1b[" in shown
    assert re.search(r"\x1b\[[0-9;]*48;2;[0-9;]*m\s*good", shown) and not re.search(
        r"48;2;[0-9;]*m\s*so", shown
    )


@pytest.mark.subprocess
def test_occlusion_on_the_onnx_export_matches_the_run(
    run_dir: Path, run: Run, validation: list[str], tmp_path: Path
) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from seqtrain.export import export_run
    from seqtrain.inference.onnx import load_exported_run

    export_run(run_dir, "onnx", tmp_path / "onnx")
    texts = validation[:60]
    on_torch, on_onnx = explain_texts(run, texts), explain_texts(load_exported_run(tmp_path / "onnx"), texts)
    for a, b in zip(on_torch, on_onnx, strict=True):
        assert a.target == b.target and a.encoded == b.encoded
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    result = runner.invoke(
        app, ["explain", str(tmp_path / "onnx"), "a film", "--method", "integrated-gradients"]
    )
    assert result.exit_code == 2 and "run directory" in result.output
    code = (  # occlusion on an export folder never imports torch
        "import sys\nfrom seqtrain.cli import app\ntry:\n"
        f"    app(['explain', {str(tmp_path / 'onnx')!r}, 'a gorgeous film', '--format', 'jsonl'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tokens"][1]["text"] == "gorgeous"


def test_top_words_per_class_in_eval_report(run: Run, run_dir: Path) -> None:
    top = top_words(run, run.config.data, "validation", max_texts=400, min_count=3)
    pos, neg = ([r["word"] for r in top["by_class"][c]] for c in ("positive", "negative"))
    assert top["texts"] == 400 and len(pos) == len(neg) == 10
    assert {"good", "best", "fun", "funny", "great", "beautiful", "love", "well"} & set(pos)
    assert {"bad", "worst", "dull", "boring", "no", "not", "too", "mess"} & set(neg)
    assert not set(pos) & set(neg)
    assert all(r["mean"] > 0 and r["n"] >= 3 for rows in top["by_class"].values() for r in rows)
    assert (
        1 <= top_words(run, run.config.data, "validation", max_texts=400, max_cost=3000)["texts"] < 100
    )  # the cost cap
    result = runner.invoke(app, ["eval", str(run_dir), "--report", "--json", "--limit", "300"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["report"]["top_words"]["by_class"]) == {"negative", "positive"}


def test_bench_table_goes_between_the_markers_and_the_prose_stays(tmp_path: Path) -> None:
    from bench.explain import BEGIN, HEADING, write_between_markers

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Other\n\nkept\n", encoding="utf-8")
    write_between_markers(path, "| table 1 |")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\n## Other\n\nkept\n") and HEADING in text and "| table 1 |" in text
    path.write_text(
        text.replace(BEGIN, "a note by hand\n\n" + BEGIN) + "\nafter the table\n", encoding="utf-8"
    )
    write_between_markers(path, "| table 2 |")
    text = path.read_text(encoding="utf-8")
    assert "| table 2 |" in text and "| table 1 |" not in text and text.count(BEGIN) == 1
    assert "a note by hand" in text and text.rstrip().endswith("after the table") and "kept" in text


def test_regression_explains_the_score(tmp_path: Path) -> None:
    """A regression run: scores are changes of the predicted score in the target's units (stars)."""
    from seqtrain.train import train
    from tests.conftest import write_hub_folder
    from tests.test_tasks import rated_rows

    data = write_hub_folder(
        tmp_path / "rated", {"train": rated_rows(800, 0), "validation": rated_rows(100, 1)}
    )
    train(
        tiny_config(
            data,
            tmp_path / "run",
            data={"label_column": "stars"},
            model={"task": "regression", "regression_head": "distribution"},
            train={"epochs": 2},
        )
    )
    reg = load_run(tmp_path / "run")[0]
    texts = ["the film was superb and brilliant", "dreadful plot , awful actors"]
    for ex in explain_texts(reg, texts):
        ids = ex.encoded.ids
        before, after = reg.probs([ids, ids[1:]], 2)[:, 0]  # the first token removed
        assert ex.probs.shape == (1,) and ex.scores[0] == pytest.approx(before - after, abs=1e-5)
    encoded = encode_with_offsets(reg.tokenizer, texts, reg.config.data)
    scores, ends = integrated_gradients(reg, encoded, [0, 0], steps=64)
    np.testing.assert_allclose([s.sum() for s in scores], ends[:, 0] - ends[:, 1], atol=0.05)  # stars
    rows = explain_cli(str(tmp_path / "run"), *texts)
    assert [r["explained"] for r in rows] == ["score", "score"] and rows[0]["score"] > rows[1]["score"]
    result = runner.invoke(app, ["explain", str(tmp_path / "run"), "good", "--label", "5"])
    assert result.exit_code == 2 and "regression" in result.output
