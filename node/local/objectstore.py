"""A real S3-compatible server on loopback (moto's standalone server) for tests and benchmarks.

Nothing here is used by a daemon: it is the object storage a test or benchmark points ``--snapshot-to
s3://...`` and ``--storage-endpoint`` at, speaking the S3 protocol over HTTP, so the code under test runs
through s3fs and botocore exactly as against AWS, MinIO or R2. Needs the ``moto[server]`` package (test extra).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

# moto accepts any credentials unless told to check them; these are what the test processes use
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "swarm-test", "AWS_SECRET_ACCESS_KEY": "swarm-test-secret"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_s3(*, check_credentials: bool = False, timeout: float = 30.0) -> Iterator[str]:
    """Runs a moto S3 server; yields its endpoint URL. With ``check_credentials`` it refuses every request
    whose access key it does not know, as AWS does (moto's IAM emulation; it knows none here)."""
    port = _free_port()
    env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if check_credentials else {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the moto S3 server did not start on {endpoint}") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def create_bucket(endpoint: str, bucket: str) -> None:
    """Creates ``bucket`` on the server at ``endpoint`` (with :data:`CREDENTIALS`)."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_boto_credentials())
    client.create_bucket(Bucket=bucket)


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }
