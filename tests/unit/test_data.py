"""node.data: tokenizer, built-in corpus, user files and their errors, batches as pure functions."""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import re
from collections import Counter
from collections.abc import Callable

import pytest
import torch

from node.data import (
    ByteTokenizer,
    Corpus,
    DataError,
    batch_for_step,
    builtin_text,
    load_corpus,
    validation_batches,
)

# ----------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_including_non_ascii() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    text = "stage 0 → stage 1: naïve façade ✓ 日本語 🙂"
    tokens = tok.encode(text)
    assert tokens.dtype == torch.uint8 and tokens.dim() == 1
    assert len(tokens) == len(text.encode("utf-8"))
    assert tok.decode(tokens) == text
    assert tok.encode("ab").tolist() == [97, 98]
    assert tok.decode([104, 105]) == "hi" and tok.decode(b"hi") == "hi"


def test_tokenizer_edge_cases() -> None:
    tok = ByteTokenizer()
    empty = tok.encode("")
    assert empty.shape == (0,) and empty.dtype == torch.uint8 and tok.decode(empty) == ""
    assert tok.decode(torch.tensor([0xFF, 0x61], dtype=torch.uint8)) == "\ufffda"  # invalid UTF-8 replaced
    assert tok.decode(tok.encode("abc").long()) == "abc"


# ----------------------------------------------------------------------------------- built-in text


def test_builtin_text_is_deterministic() -> None:
    a = builtin_text(100_000, seed=3)
    assert len(a) == 100_000
    builtin_text.cache_clear()  # a fresh computation, not the cached string, gives the same text
    assert a == builtin_text(100_000, seed=3)
    assert a != builtin_text(100_000, seed=4)
    assert builtin_text(5_000) == builtin_text()[:5_000]  # a shorter text is a prefix of the longer one
    assert builtin_text(0) == ""


def test_builtin_text_looks_learnable() -> None:
    text = builtin_text()
    assert len(text) == 2_000_000 and text.isascii()
    sample = text[:200_000]
    words = re.findall(r"[a-z]+", sample.lower())
    assert 50 < len(set(words)) < 400  # a limited vocabulary
    assert "\n\n" in sample and sample[0].isupper()
    sentences = [s for s in re.split(r"(?<=[.?]) |\n\n", sample) if s]
    assert len(sentences) > 1_000
    assert all(s[0].isupper() and s[-1] in ".?" for s in sentences[:-1])
    assert re.search(r"\b[A-Z][a-z]+ plus [a-z]+ is [a-z]+\.", sample)  # arithmetic
    assert re.search(r"\bThe [a-z]+ lives in the [a-z]+\.", sample)  # facts
    assert "three plus four is seven." in text.lower()


def test_builtin_text_bigram_entropy_is_low() -> None:
    """Conditional entropy of a character given the previous one, over the first 200k characters."""
    sample = builtin_text()[:200_000]
    pairs = Counter(itertools.pairwise(sample))
    firsts = Counter(sample[:-1])
    total = sum(pairs.values())
    bits = -sum(n / total * math.log2(n / firsts[a]) for (a, _), n in pairs.items())
    assert bits < 4.5  # far below the 8 bits of uniform bytes (the built-in text gives about 2.6)


# ---------------------------------------------------------------------------------------- corpora


def _all_text(corpus: Corpus) -> str:
    return ByteTokenizer().decode(torch.cat([corpus.train, corpus.val]))


def test_builtin_corpus_split() -> None:
    corpus = load_corpus(None)
    assert corpus.name == "builtin"
    assert corpus.train.dtype == torch.uint8 and corpus.val.dtype == torch.uint8
    total = len(corpus.train) + len(corpus.val)
    assert total == len(builtin_text().encode("utf-8"))
    assert len(corpus.val) == total // 20  # the last 5%
    assert _all_text(corpus) == builtin_text()
    corpus.check_fits(256)


def test_txt_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes("héllo wörld\n".encode() * 50 + b"\xff")
    corpus = load_corpus(path)
    assert corpus.name == str(path)
    assert _all_text(corpus) == "héllo wörld\n" * 50 + "\ufffd"  # invalid bytes replaced
    assert load_corpus(str(path)).name == str(path)  # a str works as well as a Path


def test_jsonl_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "b.jsonl"
    lines = [json.dumps({"text": "first", "id": 1}), "", "   ", json.dumps({"text": "second\u2028line"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert _all_text(load_corpus(path)) == "first\n\nsecond\u2028line"


def test_directory_is_recursive_and_sorted(tmp_path: pathlib.Path) -> None:
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "z.jsonl").write_text('{"text": "zed"}\n{"text": "zed2"}\n')
    (tmp_path / "a" / "deeper").mkdir()
    (tmp_path / "a" / "deeper" / "c.txt").write_text("sea")
    (tmp_path / "notes.md").write_text("ignored")
    assert _all_text(load_corpus(tmp_path)) == "sea\n\nzed\n\nzed2\n\nbee"


def _missing(d: pathlib.Path) -> pathlib.Path:
    return d / "missing.txt"


def _write(name: str, content: str) -> Callable[[pathlib.Path], pathlib.Path]:
    def make(d: pathlib.Path) -> pathlib.Path:
        (d / name).write_text(content)
        return d / name

    return make


def _empty_dir(d: pathlib.Path) -> pathlib.Path:
    (d / "empty").mkdir()
    (d / "empty" / "readme.md").write_text("not data")
    return d / "empty"


def _dir_of_blank_files(d: pathlib.Path) -> pathlib.Path:
    (d / "blank").mkdir()
    (d / "blank" / "a.txt").write_text("")
    (d / "blank" / "b.jsonl").write_text("\n\n")
    return d / "blank"


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (_missing, "no such file"),
        (_write("e.txt", "  \n"), "no text"),
        (_write("e.jsonl", ""), "no text"),
        (_dir_of_blank_files, "no text"),
        (_write("x.csv", "a,b"), "unsupported file type '.csv'"),
        (_write("noext", "a,b"), "unsupported file type"),
        (_empty_dir, "has no .txt, .jsonl or .parquet files"),
    ],
)
def test_bad_input_is_one_line_naming_the_path(
    tmp_path: pathlib.Path, make: Callable[[pathlib.Path], pathlib.Path], needle: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(DataError) as err:
        load_corpus(path)
    msg = str(err.value)
    assert str(path) in msg and needle in msg and "\n" not in msg
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("content", "lineno", "needle"),
    [
        ('{"text": 1}\n', 1, "expected an object with a string 'text' field"),
        ('{"text": "ok"}\n\n{oops\n', 3, "not valid JSON"),
        ('{"text": "ok"}\n["text"]\n', 2, "expected an object"),
        ('{"body": "ok"}\n', 1, "expected an object"),
        ('{"text": "ok"}\n{"text": "ok"}\n"text"\n', 3, "expected an object"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path: pathlib.Path, content: str, lineno: int, needle: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_corpus(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{lineno}: ") and needle in msg and "\n" not in msg


def test_bad_jsonl_inside_a_directory_names_that_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.jsonl").write_text("nope\n")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'sub' / 'bad.jsonl'}:1: not valid JSON")):
        load_corpus(tmp_path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "secret.txt"
    path.write_text("hidden")
    path.chmod(0)
    try:
        with pytest.raises(DataError) as err:
            load_corpus(path)
    finally:
        path.chmod(0o644)
    msg = str(err.value)
    assert str(path) in msg and "permission denied" in msg and "\n" not in msg


def test_read_error_becomes_data_error(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.txt"
    path.write_text("text")

    def fail(self: pathlib.Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "read_bytes", fail)
    with pytest.raises(DataError, match=re.escape(f"{path}: permission denied")):
        load_corpus(path)

    def fail_io(self: pathlib.Path) -> bytes:
        raise OSError(5, "Input/output error", str(self))

    monkeypatch.setattr(pathlib.Path, "read_bytes", fail_io)
    with pytest.raises(DataError, match=re.escape(f"{path}: cannot read it (Input/output error)")):
        load_corpus(path)


def test_check_fits(tmp_path: pathlib.Path) -> None:
    (tmp_path / "s.txt").write_text("short text " * 20)  # 220 tokens: 209 training, 11 validation
    corpus = load_corpus(tmp_path / "s.txt")
    assert (len(corpus.train), len(corpus.val)) == (209, 11)
    corpus.check_fits(10)
    with pytest.raises(DataError, match="validation split has 11 tokens, fewer than seq_len \\+ 1 = 12") as err:
        corpus.check_fits(11)
    assert str(tmp_path / "s.txt") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="training split has 209 tokens"):
        Corpus("x", corpus.train, torch.zeros(1000, dtype=torch.uint8)).check_fits(300)


# ---------------------------------------------------------------------------------------- batches

_SIZES = {"num_microbatches": 3, "microbatch_size": 2, "seq_len": 16}


def test_batch_for_step_is_a_pure_function_of_seed_and_step() -> None:
    tokens = load_corpus(None).train
    a = batch_for_step(tokens, seed=1, step=5, **_SIZES)
    b = batch_for_step(tokens.clone(), seed=1, step=5, **_SIZES)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == ya.shape == (2, 16)
        assert xa.dtype == ya.dtype == torch.int64
        assert torch.equal(xa[:, 1:], ya[:, :-1])  # targets are the inputs shifted by one
    other_step = batch_for_step(tokens, seed=1, step=6, **_SIZES)
    other_seed = batch_for_step(tokens, seed=2, step=5, **_SIZES)
    assert not torch.equal(a[0][0], other_step[0][0])
    assert not torch.equal(a[0][0], other_seed[0][0])


def test_batch_windows_come_from_the_tokens() -> None:
    tokens = torch.arange(40, dtype=torch.uint8)  # window content reveals its offset
    seen = set()
    for step in range(50):
        for x, y in batch_for_step(tokens, seed=0, step=step, num_microbatches=2, microbatch_size=4, seq_len=8):
            for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
                start = row_x[0]
                assert row_x == list(range(start, start + 8)) and row_y == list(range(start + 1, start + 9))
                seen.add(start)
    assert seen == set(range(40 - 8))  # every offset in [0, len - seq_len - 1] is reachable, no other
    exact = torch.arange(9, dtype=torch.uint8)  # exactly seq_len + 1 tokens: one possible window
    ((x, y),) = batch_for_step(exact, seed=3, step=0, num_microbatches=1, microbatch_size=2, seq_len=8)
    assert x.tolist() == [list(range(8))] * 2 and y.tolist() == [list(range(1, 9))] * 2


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"step": -1}, "step"),
        ({"num_microbatches": 0}, "num_microbatches"),
        ({"microbatch_size": -2}, "microbatch_size"),
        ({"seq_len": 0}, "seq_len"),
        ({"seq_len": 100}, "cannot hold"),
    ],
)
def test_batch_for_step_validates_arguments(override: dict[str, int], needle: str) -> None:
    kwargs = {"seed": 0, "step": 0, **_SIZES, **override}
    with pytest.raises(ValueError, match=needle):
        batch_for_step(torch.zeros(50, dtype=torch.uint8), **kwargs)


def test_validation_batches_are_fixed_and_evenly_spaced() -> None:
    val = load_corpus(None).val
    v1 = validation_batches(val, num_batches=2, batch_size=4, seq_len=16)
    v2 = validation_batches(val, num_batches=2, batch_size=4, seq_len=16)
    assert len(v1) == 2
    for (x1, y1), (x2, y2) in zip(v1, v2, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert x1.shape == (4, 16) and x1.dtype == torch.int64
        assert torch.equal(x1[:, 1:], y1[:, :-1])
    tokens = torch.arange(100, dtype=torch.uint8)
    batches = validation_batches(tokens, num_batches=2, batch_size=2, seq_len=10)
    starts = [row[0] for x, _ in batches for row in x.tolist()]
    assert starts == [0, 29, 59, 89]  # first at 0, last at len - seq_len - 1
    ((x, _),) = validation_batches(tokens, num_batches=1, batch_size=1, seq_len=10)
    assert x[0, 0].item() == 0
    with pytest.raises(ValueError, match="cannot hold"):
        validation_batches(tokens[:10], num_batches=1, batch_size=1, seq_len=10)
    with pytest.raises(ValueError, match="batch_size"):
        validation_batches(tokens, num_batches=1, batch_size=0, seq_len=10)
