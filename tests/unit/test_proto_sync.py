"""The committed generated gRPC code must match what protoc makes from proto/*.proto today."""

import pathlib

from node.proto import GENERATED, REPO_ROOT, generate


def test_generated_code_matches_proto_sources(tmp_path: pathlib.Path) -> None:
    fresh = generate(tmp_path)
    for path in fresh:
        committed = REPO_ROOT / "node" / "proto" / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} is out of date with proto/: run `python -m node.proto`"
        )
    assert {p.name for p in fresh} == set(GENERATED)
