"""Training data: the byte-level tokenizer, corpora (built-in or the user's files) and step batches."""

from node.data.batches import batch_for_step, training_batch, validation_batches
from node.data.corpus import Corpus, DataError, builtin_text, load_corpus
from node.data.tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "DataError",
    "batch_for_step",
    "builtin_text",
    "load_corpus",
    "training_batch",
    "validation_batches",
]
