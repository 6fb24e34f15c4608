"""``python -m node.proto``: regenerate the committed gRPC modules from ``proto/``."""

from node.proto import REPO_ROOT, generate

for path in generate(REPO_ROOT):
    print(f"wrote {path.relative_to(REPO_ROOT)}")
