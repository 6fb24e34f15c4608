"""Data: tokenizer, built-in corpus, user files and their errors, step batches as pure functions."""

from __future__ import annotations

import itertools
import math
import pathlib
from collections import Counter

import pytest
import torch

from node.data import ByteTokenizer, DataError, batch_for_step, builtin_text, load_corpus, validation_batches


def test_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "stage 0 → stage 1: naïve façade ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("ab").tolist() == [97, 98]


def test_builtin_corpus_is_deterministic_and_learnable() -> None:
    a = builtin_text(100_000, seed=3)
    assert a == builtin_text(100_000, seed=3) and a != builtin_text(100_000, seed=4)
    sample = builtin_text()[:200_000]
    assert len(set(sample.split())) < 300
    pairs = Counter(itertools.pairwise(sample))
    firsts = Counter(sample[:-1])
    total = sum(pairs.values())
    cond_entropy = -sum(n / total * math.log2(n / firsts[a]) for (a, _), n in pairs.items())
    assert cond_entropy < 3.0  # bits/char given the previous one, far below 8: there is structure to learn


def test_user_files(tmp_path: pathlib.Path) -> None:
    (tmp_path / "a.txt").write_text("hello world " * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "first"}\n\n{"text": "second"}\n')
    jsonl = load_corpus(tmp_path / "sub" / "b.jsonl")
    assert ByteTokenizer().decode(torch.cat([jsonl.train, jsonl.val])) == "first\n\nsecond"
    corpus = load_corpus(tmp_path)
    assert len(corpus.train) + len(corpus.val) == len(("hello world " * 100) + "\n\n" + "first\n\nsecond")


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: d / "missing.txt", "no such file"),
        (lambda d: (d / "e.txt").write_text("  \n") and d / "e.txt", "no text"),
        (lambda d: (d / "x.csv").write_text("a,b") and d / "x.csv", "unsupported file type"),
        (lambda d: (d / "b.jsonl").write_text('{"text": 1}\n') and d / "b.jsonl", ":1: expected an object"),
        (lambda d: (d / "c.jsonl").write_text('{"text": "ok"}\n{oops\n') and d / "c.jsonl", ":2: not valid JSON"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "has no .txt or .jsonl"),
    ],
)
def test_bad_data_is_one_line_naming_the_path(tmp_path: pathlib.Path, make, needle: str) -> None:
    path = make(tmp_path)
    with pytest.raises(DataError) as err:
        load_corpus(path)
    msg = str(err.value)
    assert str(path) in msg and needle in msg and "\n" not in msg


def test_too_short_corpus_is_refused(tmp_path: pathlib.Path) -> None:
    (tmp_path / "s.txt").write_text("short text")
    with pytest.raises(DataError, match="fewer than seq_len"):
        load_corpus(tmp_path / "s.txt").check_fits(128)


def test_batch_is_a_pure_function_of_seed_and_step() -> None:
    tokens = load_corpus(None).train
    kw = dict(num_microbatches=3, microbatch_size=2, seq_len=16)
    a = batch_for_step(tokens, seed=1, step=5, **kw)
    b = batch_for_step(tokens, seed=1, step=5, **kw)
    c = batch_for_step(tokens, seed=1, step=6, **kw)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (2, 16) and xa.dtype == torch.int64
        assert torch.equal(xa[:, 1:], ya[:, :-1])  # targets are the inputs shifted by one
    assert not torch.equal(a[0][0], c[0][0])
    v1 = validation_batches(load_corpus(None).val, num_batches=2, batch_size=4, seq_len=16)
    v2 = validation_batches(load_corpus(None).val, num_batches=2, batch_size=4, seq_len=16)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(v1, v2, strict=True))
