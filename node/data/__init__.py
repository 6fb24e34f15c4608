"""Training data: tokenizers (byte-level, Hugging Face tokenizer.json), corpora (built-in, the user's files, or
prepared memory-mapped shards) and step batches."""

from node.data.batches import batch_for_step, training_batch, validation_batches
from node.data.corpus import Corpus, DataError, builtin_text, load_corpus, load_corpus_for
from node.data.shards import ShardError, TokenArray
from node.data.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "DataError",
    "HFTokenizer",
    "ShardError",
    "TokenArray",
    "TokenizerError",
    "batch_for_step",
    "builtin_text",
    "load_corpus",
    "load_corpus_for",
    "load_tokenizer",
    "training_batch",
    "validation_batches",
]
