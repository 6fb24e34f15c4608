"""Tokenizers (byte-level, tokenizer.json, training a BPE) and prepared corpora (shards, manifest, memory map)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from node.cli import main
from node.config import build_config
from node.data import (
    ByteTokenizer,
    DataError,
    TokenArray,
    TokenizerError,
    batch_for_step,
    builtin_text,
    load_corpus,
    load_corpus_for,
    load_tokenizer,
    validation_batches,
)
from node.data.corpus import iter_documents, source_files
from node.data.shards import ShardError, open_shards, prepare
from node.data.tokenizer import train_tokenizer

TEXT = builtin_text(60_000)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tokenizer(iter([TEXT]), 300, path)


def test_byte_level_tokenizer_json_gives_the_byte_ids(tmp_path: pathlib.Path) -> None:
    (tmp_path / "tokenizer.json").write_text(ByteTokenizer().to_json())
    tok = load_tokenizer(tmp_path)
    text = "stage 0 → naïve 日本語 🙂\n\n"
    assert tok.vocab_size == 256 and tok.encode(text).tolist() == list(text.encode())
    assert tok.decode(tok.encode(text)) == text


def test_trained_bpe_round_trips_and_compresses(bpe) -> None:
    assert bpe.vocab_size == 300 and bpe.eos_token_id is not None
    ids = bpe.encode(TEXT[:2000])
    assert len(ids) < 2000 * 0.8 and int(ids.max()) < 300
    assert bpe.decode(ids) == TEXT[:2000]
    assert load_tokenizer(bpe.source).encode("the fox").tolist() == bpe.encode("the fox").tolist()


@pytest.mark.parametrize(
    ("content", "needle"),
    [(None, "no such tokenizer file"), ("{oops", "invalid JSON"), ('{"model": 3}', "tokenizers library can read")],
)
def test_bad_tokenizer_files_are_one_line(tmp_path: pathlib.Path, content: str | None, needle: str) -> None:
    path = tmp_path / "t.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(path)
    assert needle in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_tokenizer_sets_the_vocabulary_and_the_fingerprint(bpe, capsys: pytest.CaptureFixture[str]) -> None:
    from node.cli import _options_from_flags, _parser

    args = _parser().parse_args(["run", "--stage", "1", "--num-stages", "4", "--insecure", "--tokenizer", bpe.source])
    opts = _options_from_flags(args)
    assert opts.config.model.vocab_size == 300 and opts.config.tokenizer == bpe.source
    assert opts.config.fingerprint() != build_config(overrides={"num_stages": 4}).fingerprint()
    cfg_file = pathlib.Path(bpe.source).parent / "c.json"
    cfg_file.write_text(json.dumps({"model": {"vocab_size": 512}}))
    code = main(["run", "--stage", "1", "--num-stages", "4", "--insecure", "--tokenizer", bpe.source,
                 "--config", str(cfg_file)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "has 300 tokens but the configuration's vocab_size is 512" in err and "\n" not in err


def _inputs(tmp_path: pathlib.Path) -> pathlib.Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(TEXT[:30_000])
    (d / "sub" / "b.jsonl").write_text("".join(json.dumps({"text": f"line {i} of json"}) + "\n" for i in range(50)))
    pq.write_table(pa.table({"id": list(range(40)), "text": [f"row {i} of parquet" for i in range(40)]}),
                   d / "c.parquet")  # fmt: skip
    return d


def test_prepare_reads_txt_jsonl_and_parquet_into_checked_shards(tmp_path: pathlib.Path, bpe) -> None:
    d = _inputs(tmp_path)
    docs = list(iter_documents(source_files(d)))
    assert "row 7 of parquet" in docs and "line 3 of json" in docs
    manifest = prepare(iter(docs), bpe, tmp_path / "prep", shard_tokens=4000)
    assert manifest["dtype"] == "uint16" and len(manifest["shards"]) > 2
    tokens, _ = open_shards(tmp_path / "prep", vocab_size=300)
    expected = np.concatenate([bpe.encode_batch([doc + "\n\n"])[0] for doc in docs])
    assert len(tokens) == manifest["total_tokens"] == len(expected)
    assert torch.equal(tokens.long(), torch.from_numpy(expected))
    assert (tmp_path / "prep" / "tokenizer.json").read_text() == bpe.to_json()


def test_batches_from_the_memory_map_equal_those_from_a_tensor(tmp_path: pathlib.Path) -> None:
    prepare(iter([TEXT]), ByteTokenizer(), tmp_path / "prep", shard_tokens=7_000)  # windows cross shard ends
    corpus = load_corpus(tmp_path / "prep")
    assert isinstance(corpus.train, TokenArray)
    tensor = ByteTokenizer().encode(TEXT + "\n\n").long()
    cut = len(tensor) - max(1, int(len(tensor) * 0.05))
    for step in (0, 1, 17):
        got = batch_for_step(corpus.train, seed=5, step=step, num_microbatches=3, microbatch_size=4, seq_len=64)
        want = batch_for_step(tensor[:cut], seed=5, step=step, num_microbatches=3, microbatch_size=4, seq_len=64)
        assert all(torch.equal(a, b) for pair in zip(got, want, strict=True) for a, b in zip(*pair, strict=True))
    val = validation_batches(corpus.val, num_batches=2, batch_size=2, seq_len=32)
    want_val = validation_batches(tensor[cut:], num_batches=2, batch_size=2, seq_len=32)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, want_val, strict=True))


def _prepared(tmp_path: pathlib.Path) -> pathlib.Path:
    prepare(iter([TEXT]), ByteTokenizer(), tmp_path / "prep", shard_tokens=20_000)
    return tmp_path / "prep"


def test_truncated_shard_is_named(tmp_path: pathlib.Path) -> None:
    shard = _prepared(tmp_path) / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"shard-00001.bin: truncated shard"):
        load_corpus(tmp_path / "prep")


def test_changed_shard_fails_its_checksum(tmp_path: pathlib.Path) -> None:
    shard = _prepared(tmp_path) / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-00000.bin: checksum mismatch"):
        load_corpus(tmp_path / "prep")


def test_vocabulary_larger_than_the_model_is_refused(tmp_path: pathlib.Path, bpe) -> None:
    prepare(iter([TEXT]), bpe, tmp_path / "prep")
    with pytest.raises(ShardError, match=r"shard-00000.bin: token id 29\d is outside the model's vocabulary"):
        open_shards(tmp_path / "prep", vocab_size=256)
    cfg = build_config(overrides={"data": str(tmp_path / "prep")})  # byte-level model, BPE data
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        load_corpus_for(cfg)


def test_prepare_and_train_commands(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _inputs(tmp_path)
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--data", str(d), "--vocab-size", "320", "--out", str(tok)]) == 0
    assert main(["data", "prepare", "--data", str(d), "--tokenizer", str(tok), "--out", str(tmp_path / "p"),
                 "--json"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out["vocab_size"] == 320 and out["total_tokens"] > 0
    # the prepared directory's tokenizer sets the vocabulary of a swarm trained on it
    from node.cli import _options_from_flags, _parser

    args = _parser().parse_args(
        ["run", "--stage", "0", "--num-stages", "4", "--insecure", "--data", str(tmp_path / "p")]
    )
    assert _options_from_flags(args).config.model.vocab_size == 320
    assert main(["data", "prepare", "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "q")]) == 2
    assert main(["tokenizer", "train", "--data", str(d), "--vocab-size", "100", "--out", str(tok)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no such file" in err[0] and "at least 257" in err[1]
