"""Where checkpoints and snapshots live: a local directory, or object storage through fsspec.

A :class:`Storage` holds objects under one URL prefix, addressed by '/'-separated keys. ``put`` is atomic on
every backend: a local file is written to a temporary name, fsynced and renamed (a crash leaves at most a
``.tmp`` file, which no listing shows); an object-storage PUT is atomic by itself. So a reader sees an object
whole or not at all, and the layers above make a checkpoint exist only once its manifest, written last, does.

URLs: a plain path or ``file://PATH``; ``s3://bucket/prefix`` (with ``endpoint`` for MinIO, R2, GCS's S3
interoperability and the like; credentials the way AWS tools take them: ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``, a profile, or the VM's instance role); any other protocol that an installed
fsspec implementation serves (``gs://`` with gcsfs, ``az://`` with adlfs, ``memory://``).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import uuid
from typing import Any, Protocol

# one attempt at a dead endpoint must not stall start-up for minutes (botocore's default is 60 s, 5 tries)
S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}


class StorageError(RuntimeError):
    """The storage cannot be used (missing bucket, wrong credentials, unreachable, read-only): one line."""


class Storage(Protocol):
    """Objects under one prefix. Keys are relative, '/'-separated; missing objects raise FileNotFoundError."""

    url: str

    def put(self, key: str, data: bytes) -> None:
        """Stores ``data`` at ``key`` atomically (whole or not at all), replacing what was there."""
        ...

    def get(self, key: str) -> bytes: ...

    def size(self, key: str) -> int | None:
        """The object's size in bytes, or None when it does not exist."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Names (not keys) of the objects directly under ``prefix``; empty when there are none."""
        ...

    def delete(self, key: str) -> None:
        """Removes ``key``; a missing one is not an error."""
        ...

    def check(self) -> None:
        """Writes, reads back and deletes a probe object; raises :class:`StorageError` naming what is wrong."""
        ...


def open_storage(url: str | os.PathLike[str], endpoint: str | None = None) -> Storage:
    """The storage at ``url`` (a path, ``file://``, ``s3://`` or another fsspec protocol)."""
    text = os.fspath(url)
    if "://" not in text:
        return LocalStorage(pathlib.Path(text))
    protocol, _, rest = text.partition("://")
    if protocol == "file":
        return LocalStorage(pathlib.Path(rest))
    return FsspecStorage(protocol, rest.strip("/"), endpoint)


def _fsync_dir(path: pathlib.Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomically(path: pathlib.Path, data: bytes) -> None:
    """``data`` at ``path``, complete or not at all: written to a temporary file, fsynced and renamed; the
    temporary file is removed when any of it fails (ENOSPC, EFBIG, EIO...)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


class LocalStorage:
    """A directory (which must outlive the machine to be of use: a shared volume, NFS, a mounted bucket)."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = pathlib.Path(root)
        self.url = str(self.root)

    def path(self, key: str) -> pathlib.Path:
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data)

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def size(self, key: str) -> int | None:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            return None

    def list(self, prefix: str) -> list[str]:
        path = self.path(prefix)
        if not path.is_dir():
            return []
        return [p.name for p in path.iterdir() if not p.name.endswith(".tmp")]

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def check(self) -> None:
        probe = f".probe-{uuid.uuid4().hex}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.put(probe, b"probe")
            self.delete(probe)
        except OSError as err:
            raise StorageError(f"{self.url}: {err.strerror or err}") from None


class FsspecStorage:
    """Object storage through an fsspec filesystem (s3fs for ``s3://``), with listing caches off: other
    processes write here too."""

    def __init__(self, protocol: str, root: str, endpoint: str | None = None) -> None:
        import fsspec

        self.url = f"{protocol}://{root}"
        self.root = root
        kwargs: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
        if protocol in ("s3", "s3a"):
            kwargs["config_kwargs"] = S3_CONFIG
            if endpoint is None:
                endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                kwargs["endpoint_url"] = endpoint
        elif endpoint is not None:
            raise StorageError(f"{self.url}: an endpoint override applies to s3:// URLs only")
        try:
            self.fs = fsspec.filesystem(protocol, **kwargs)
        except (ImportError, ValueError) as err:
            raise StorageError(f"{self.url}: no storage backend for {protocol}:// ({err})") from None

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(key), data)

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def size(self, key: str) -> int | None:
        try:
            return int(self.fs.info(self._path(key))["size"])
        except FileNotFoundError:
            return None

    def list(self, prefix: str) -> list[str]:
        try:
            entries = self.fs.ls(self._path(prefix), detail=False)
        except FileNotFoundError:
            return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))

    def check(self) -> None:
        probe = f".probe-{uuid.uuid4().hex}"
        bucket = self.root.split("/", 1)[0]
        try:
            try:
                self.fs.info(bucket)
            except FileNotFoundError:
                raise StorageError(
                    f"{self.url}: bucket {bucket!r} does not exist (or these credentials cannot see it)"
                ) from None
            self.put(probe, b"probe")
            if self.get(probe) != b"probe":
                raise StorageError(f"{self.url}: a probe object read back differently")
            self.delete(probe)
        except StorageError:
            raise
        except PermissionError as err:
            raise StorageError(f"{self.url}: access denied ({_first_line(err)}); check the credentials") from None
        except Exception as err:  # botocore's and aiohttp's errors have no common base but Exception
            raise StorageError(f"{self.url}: {type(err).__name__}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]
