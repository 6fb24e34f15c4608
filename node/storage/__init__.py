"""Durable storage for checkpoints and swarm snapshots: a local directory or object storage, behind one
small interface (:class:`Storage`), chosen by URL."""

from node.storage.backends import Storage, StorageError, open_storage

__all__ = ["Storage", "StorageError", "open_storage"]
