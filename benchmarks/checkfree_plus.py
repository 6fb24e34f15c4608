"""The price of CheckFree+: replica bytes against stage sizes, and loss with and without swapped routes.

Bytes are counted from exactly what the daemon sends (``StageRuntime.full_state`` of stage 0 after one
optimizer step: weights and AdamW moments), per step with ``--embed-sync-every 1``, to each of stages 1
and S-1. The loss comparison trains the single-process reference, which the swarm matches bit for bit (the
``--check-reference`` tests), with plain and out-of-order routes on the same batches, and reports the
held-out validation loss after N steps. No failures are injected: this is the cost side only.

    python benchmarks/checkfree_plus.py [--stages 5] [--steps 200] [--out benchmarks/results/checkfree_plus.json]
"""

from __future__ import annotations

import argparse
import os
import pathlib

import torch
from _common import RESULTS, write_results

from node.config import build_config
from node.data import load_corpus, validation_batches
from node.stage.runtime import StageRuntime
from node.train.reference import train_reference


def stage_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@torch.no_grad()
def val_loss(run, cfg, tokens: torch.Tensor) -> float:
    batches = validation_batches(tokens, num_batches=8, batch_size=8, seq_len=cfg.train.seq_len)
    return sum(float(run.model(x, y)) for x, y in batches) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=5)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "checkfree_plus.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    base = {"num_stages": args.stages, "model": {"n_layers": args.n_layers}}
    cfg_plain = build_config(overrides=base)
    cfg_plus = build_config(overrides={**base, "out_of_order": True})

    rt0 = StageRuntime(cfg_plus, 0, torch.device("cpu"))
    for p in rt0.module.parameters():  # one step so that AdamW moments exist, as after any commit
        p.grad = torch.zeros_like(p)
    rt0.optimizer.step()
    replica = sum(t.numel() * t.element_size() for t in rt0.full_state().values())
    sizes = {s: stage_bytes(StageRuntime(cfg_plus, s, torch.device("cpu")).module) for s in range(args.stages)}

    corpus = load_corpus(None)
    runs = {}
    for name, cfg in (("plain", cfg_plain), ("out_of_order", cfg_plus)):
        run = train_reference(cfg, corpus.train, args.steps)
        runs[name] = {"final_train_loss": sum(run.losses[-10:]) / 10, "val_loss": val_loss(run, cfg, corpus.val)}

    result = {
        "benchmark": "checkfree_plus",
        "stages": args.stages,
        "steps": args.steps,
        "stage_weight_bytes": sizes,
        "replica_bytes_held_per_holder": replica,
        "replica_holders": [1, args.stages - 1],
        "extra_bytes_sent_per_step": 2 * replica,
        "activation_bytes_per_step": 2
        * (args.stages)
        * cfg_plus.train.microbatches_per_step
        * cfg_plus.train.microbatch_size
        * cfg_plus.train.seq_len
        * cfg_plus.model.d_model
        * 4,
        "loss": runs,
        "val_loss_price": runs["out_of_order"]["val_loss"] - runs["plain"]["val_loss"],
    }
    print("stage weight bytes:", ", ".join(f"{s}: {b / 2**20:.2f} MiB" for s, b in sizes.items()))
    print(
        f"stage-0 copy held on stages 1 and {args.stages - 1}: {replica / 2**20:.2f} MiB each "
        f"(weights + AdamW moments = {replica / sizes[0]:.1f}x stage 0's weights)"
    )
    print(
        f"extra bytes sent per step (K=1): {2 * replica / 2**20:.2f} MiB; activations+gradients per step: "
        f"{result['activation_bytes_per_step'] / 2**20:.1f} MiB"
    )
    for name, r in runs.items():
        print(f"{name:>13}: train loss (last 10) {r['final_train_loss']:.4f}, validation loss {r['val_loss']:.4f}")
    print(f"price of swaps after {args.steps} steps: {result['val_loss_price']:+.4f} validation loss")
    write_results(args.out, result)


if __name__ == "__main__":
    main()
