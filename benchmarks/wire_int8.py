"""Blockwise int8 on the wire against fp32: validation loss after a fixed number of steps, and tokens/s.

Runs, side by side for each seed, ``swarm-node local --stages 4 --steps N`` with activations and gradients
in fp32 on the wire and with ``wire_dtype = "int8"`` (the same model, data and seed), evaluates at the end,
and reports the relative difference of the final validation loss (goal: within 1 %) and the tokens/s ratio.
On loopback the bytes saved buy little: the ratio that matters is over a slow link (``benchmarks/wan.py``
in issue 17's plan, not built yet); this run shows what int8 costs in loss and in CPU time.

    python benchmarks/wire_int8.py [--steps 100] [--seeds 2]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile

from _common import RESULTS, median_step_seconds, run_local, write_results


def run(steps: int, seed: int, wire: str | None) -> dict:
    config = pathlib.Path(tempfile.mkdtemp()) / "wire.toml"
    config.write_text((f'wire_dtype = "{wire}"\n' if wire else "") + f"[train]\nseed = {seed}\n")
    summary = run_local(
        ["--stages", "4", "--steps", str(steps), "--eval-every", str(steps), "--config", str(config)], timeout=1200
    )
    return {
        "val_loss": summary["evaluations"][-1]["val_loss"],
        "tokens_per_second": summary["tokens_per_second"],
        "median_step_seconds": median_step_seconds(summary),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "wire_int8.json")
    args = parser.parse_args()
    rows = []
    for seed in range(args.seeds):
        fp32, int8 = run(args.steps, seed, None), run(args.steps, seed, "int8")
        rows.append({"seed": seed, "fp32": fp32, "int8": int8})
        print(
            f"seed {seed}: val loss fp32 {fp32['val_loss']:.4f}, int8 {int8['val_loss']:.4f}; step "
            f"{fp32['median_step_seconds']:.3f} s vs {int8['median_step_seconds']:.3f} s"
        )
    rel = [r["int8"]["val_loss"] / r["fp32"]["val_loss"] - 1 for r in rows]
    speed = [r["fp32"]["median_step_seconds"] / r["int8"]["median_step_seconds"] for r in rows]
    spread = statistics.stdev if len(rows) > 1 else lambda _: 0.0
    report = {
        "steps": args.steps,
        "seeds": args.seeds,
        "runs": rows,
        "val_loss_relative_difference": {"mean": statistics.mean(rel), "sd": spread(rel), "each": rel},
        "step_speed_int8_vs_fp32": {"mean": statistics.mean(speed), "sd": spread(speed), "each": speed},
        "goal": "validation loss within 1 % of fp32",
    }
    print(
        f"int8 validation loss vs fp32: {100 * report['val_loss_relative_difference']['mean']:+.2f} % "
        f"(sd {100 * report['val_loss_relative_difference']['sd']:.2f} %); step speed int8/fp32 "
        f"{report['step_speed_int8_vs_fp32']['mean']:.2f}x on loopback"
    )
    write_results(args.out, report)


if __name__ == "__main__":
    main()
