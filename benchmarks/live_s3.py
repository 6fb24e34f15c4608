"""The live bench with its checkpoints in object storage, as on spot VMs whose disks die with them.

Starts an S3-compatible server on loopback (moto, the one the tests use) with a bucket ``bench``, and runs
``swarm-node bench --mode live --checkpoint-to s3://bench/ckpt --storage-endpoint URL`` against it with every
other argument passed through unchanged. Loopback storage is faster than a cloud's, so a checkpoint costs
less here than on a real swarm; the simulate mode's ``--storage-bandwidth`` puts the cloud's rate on its clock.

    python benchmarks/live_s3.py --strategies none,checkfree+,ladder,checkpoint --failure-rates 0.02 \\
        --iterations 60 --seeds 2 --out benchmarks/results/bench-live-s3
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from _common import REPO

from node.local.objectstore import CREDENTIALS, create_bucket, local_s3


def main() -> int:
    if any(a.startswith(("--checkpoint-to", "--storage-endpoint", "--mode")) for a in sys.argv[1:]):
        raise SystemExit("live_s3.py sets --mode, --checkpoint-to and --storage-endpoint itself")
    env = {**os.environ, **CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1"}
    with local_s3() as endpoint:
        create_bucket(endpoint, "bench")
        cmd = [sys.executable, "-m", "node", "bench", "--mode", "live", "--checkpoint-to", "s3://bench/ckpt",
               "--storage-endpoint", endpoint, *sys.argv[1:]]  # fmt: skip
        bench = subprocess.Popen(cmd, cwd=REPO, env=env)
        # SIGTERM goes on to the bench, which tears its swarm down; the S3 server is stopped on the way out
        signal.signal(signal.SIGTERM, lambda *_: bench.send_signal(signal.SIGTERM))
        try:
            return bench.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the bench too: the S3 server outlives its clean-up
            return bench.wait()


if __name__ == "__main__":
    sys.exit(main())
