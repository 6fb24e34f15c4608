"""Several peers per stage: throughput with replicas against one peer per stage, with emulated compute.

On this 2-core machine the stages' real compute contends for the same cores, so replica parallelism is
measured with ``--emulate-compute SECONDS``: every block stage also sleeps that long per microbatch and
direction (the real compute still runs, and the math stays exact). Runs, side by side, ``swarm-node local
--stages 4`` with one peer per stage, with ``--replicas 2`` on every block stage, and with ``--replicas 2
--replica-slowdown 2`` (every extra replica half as fast), and reports tokens/s over the steps where every
replica took part (the extra replicas join once the swarm trains). Goals: 2 replicas ≥ 1.8× one; a
half-speed replica ≥ 0.9× the ideal (1.5× one).

    python benchmarks/replicas.py [--steps 60] [--emulate 0.1] [--repeats 1]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics

from _common import RESULTS, run_local, write_results


def tokens_per_second(summary: dict, replicated: bool) -> tuple[float, int]:
    """Median tokens/s over the steps every stage ran with its replicas (all steps past 5 without)."""
    tokens = summary["tokens_per_second"] * sum(summary["step_seconds"])  # every step has as many tokens
    per_step = tokens / len(summary["step_seconds"])
    rows = list(zip(summary["step_seconds"], summary["step_assignments"], strict=True))
    seconds = [t for t, a in rows if a and len(a) == 3] if replicated else [t for t, _ in rows[5:]]
    if not seconds:
        return 0.0, 0
    return per_step / statistics.median(seconds), len(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--emulate", type=float, default=0.1, help="--emulate-compute seconds")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "replicas.json")
    args = parser.parse_args()
    base = ["--stages", "4", "--steps", str(args.steps), "--emulate-compute", str(args.emulate)]
    variants = {
        "one peer per stage": base,
        "2 replicas": [*base, "--replicas", "2"],
        "2 replicas, one at half speed": [*base, "--replicas", "2", "--replica-slowdown", "2"],
    }
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in variants}
    for i in range(args.repeats):
        for name, flags in variants.items():
            summary = run_local(flags, timeout=1200)
            results[name].append(tokens_per_second(summary, name != "one peer per stage"))
            print(f"repeat {i + 1}: {name}: {results[name][-1][0]:.0f} tokens/s over {results[name][-1][1]} steps")
    median = {name: statistics.median(t for t, _ in runs) for name, runs in results.items()}
    one = median["one peer per stage"]
    report = {
        "steps": args.steps,
        "emulate_compute": args.emulate,
        "repeats": args.repeats,
        "tokens_per_second": {name: [t for t, _ in runs] for name, runs in results.items()},
        "steps_measured": {name: [n for _, n in runs] for name, runs in results.items()},
        "two_replicas_vs_one": median["2 replicas"] / one if one else None,
        "half_speed_vs_ideal": median["2 replicas, one at half speed"] / (1.5 * one) if one else None,
        "goals": {"two_replicas_vs_one": ">= 1.8", "half_speed_vs_ideal": ">= 0.9"},
    }
    print(
        f"2 replicas / 1: {report['two_replicas_vs_one']:.2f}x; one replica at half speed / ideal: "
        f"{report['half_speed_vs_ideal']:.2f}"
    )
    write_results(args.out, report)


if __name__ == "__main__":
    main()
