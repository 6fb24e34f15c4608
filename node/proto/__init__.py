"""Generated gRPC code for ``proto/*.proto`` and the command that regenerates it.

The generated modules are committed so that installing the package needs no protoc; a test
regenerates them into a temporary directory and fails when they drift from the sources.
Regenerate with ``python -m node.proto``.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "proto"
GENERATED = ("stage_pb2.py", "stage_pb2_grpc.py", "stage_pb2.pyi")


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    """Runs grpc_tools.protoc on every ``proto/*.proto`` and writes ``<out_root>/node/proto/*``.

    The ``node/proto=proto`` import mapping makes the generated code import ``node.proto.stage_pb2``.
    """
    protos = sorted(PROTO_DIR.glob("*.proto"))
    (out_root / "node" / "proto").mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-Inode/proto={PROTO_DIR}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(f"node/proto/{p.name}" for p in protos),
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_DIR)
    return [out_root / "node" / "proto" / name for name in GENERATED]
