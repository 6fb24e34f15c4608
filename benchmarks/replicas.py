"""Several peers per stage: throughput with replicas against one peer per stage, with emulated compute.

On this 2-core machine the stages' real compute contends for the same cores, so replica parallelism is
measured with ``--emulate-compute SECONDS``: every block stage also sleeps that long per microbatch and
direction (the real compute still runs, and the math stays exact). Runs, side by side, ``swarm-node local
--stages 4`` with one peer per stage, with ``--replicas 2`` on every block stage, and with ``--replicas 2
--replica-slowdown 2`` (every extra replica half as fast), and reports tokens/s over the steps where every
replica took part (the extra replicas join once the swarm trains). Goals: 2 replicas ≥ 1.8× one; a
half-speed replica ≥ 0.9× the ideal (1.5× one). Then, with two replicas everywhere, one replica of stage 2
killed mid-backward: the time it costs around the kill (goal: under one step) and the validation losses
against the same run without the kill (goal: equal).

The schedule bounds the speed-up: a step runs every microbatch forward, then every one backward, through the
S - 1 = 3 emulated stages, so with M microbatches one peer per stage takes about (M + 2) emulated periods per
direction and two replicas (M / 2 + 2): 1.5x at the default M = 4, 1.8x at M = 16. ``--microbatches`` sets M
(the printed ``bubble_bound`` is that ratio). The same count gives each run's theoretical step time,
2 × (M + 2) emulated periods for one peer (2 × (M / 2 + 2) with two replicas); ``schedule_efficiency`` is that
over the measured median step (issue 17's bubble measure without CPU contention: 1.0 would be the schedule
itself with nothing else on the step).

    python benchmarks/replicas.py [--steps 60] [--emulate 0.1] [--microbatches 16] [--repeats 1] [--no-kill]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile

from _common import RESULTS, run_local, write_results


def tokens_per_second(summary: dict, replicated: bool) -> tuple[float, int, float]:
    """Median tokens/s over the steps every stage ran with its replicas (all steps past 5 without), how many
    steps that is, and their median step time."""
    tokens = summary["tokens_per_second"] * sum(summary["step_seconds"])  # every step has as many tokens
    per_step = tokens / len(summary["step_seconds"])
    rows = list(zip(summary["step_seconds"], summary["step_assignments"], strict=True))
    seconds = [t for t, a in rows if a and len(a) == 3] if replicated else [t for t, _ in rows[5:]]
    if not seconds:
        return 0.0, 0, 0.0
    return per_step / statistics.median(seconds), len(seconds), statistics.median(seconds)


def prepare_seconds(summary: dict, replicated: bool) -> float | None:
    """Median prepare round (stage 0's Prepare to every stage until the decision) over the same steps as
    :func:`tokens_per_second`: with replicas it includes their partial-gradient exchange."""
    rows = list(zip(summary["prepare_seconds"], summary["step_assignments"], strict=True))
    seconds = [p for p, a in rows if p is not None and a and len(a) == 3] if replicated else [
        p for p, _ in rows[5:] if p is not None]  # fmt: skip
    return statistics.median(seconds) if seconds else None


def transfer_bound(microbatches: int, stream_gib_s: float) -> dict:
    """The least time a partial-gradient exchange can take: one block stage's gradients (fp32, the size of its
    weights) sent to its co-replica at the measured stream rate (both replicas send at once, each its own)."""
    from node.config import build_config
    from node.recovery.rebuild import expected_state, state_bytes

    cfg = build_config(overrides={"num_stages": 4, "train": {"microbatches_per_step": microbatches}})
    nbytes = max(state_bytes(expected_state(cfg, s)) for s in range(1, cfg.num_stages))
    return {"partial_bytes": nbytes, "stream_gib_per_s": stream_gib_s, "seconds": nbytes / (stream_gib_s * 2**30)}


def measured_stream_rate() -> float:
    """The stage service's mTLS stream rate on this machine's loopback (benchmarks/transport.py), GiB/s."""
    path = RESULTS / "transport.json"
    if not path.exists():
        return 1.0
    rows = json.loads(path.read_text())["rows"]
    return max(r["mtls_gib_per_s"] for r in rows)


def losing_a_replica(base: list[str], steps: int) -> dict:
    """Two replicas per block stage, with and without one replica of stage 2 killed as it is about to compute a
    backward pass at step ``3 * steps // 4`` (the extra replicas join once the swarm trains, around step 25
    here: an earlier kill may hit a stage's only peer, which ``--no-respawn`` never replaces): the killed run's
    extra time around the kill (the slowest of the three steps around it, less the median step) and both runs'
    validation losses."""
    kill_at = 3 * steps // 4
    flags = [*base, "--replicas", "2", "--eval-every", str(max(1, steps // 6)), "--no-respawn"]
    clean = run_local(flags, timeout=1200)
    killed = run_local([*flags, "--kill", f"2@{kill_at}:backward"], timeout=1200)
    seconds = killed["step_seconds"]
    median = statistics.median(seconds)
    around = seconds[max(0, kill_at - 2) : kill_at + 1]  # step_seconds[i] is step i + 1's
    rebuilt = [r for r in killed["recoveries"] if r.get("stage") == 2 and r.get("method") != "replica"]
    return {
        "kill_at_step": kill_at,
        "median_step_seconds": median,
        "cost_seconds": max(around) - median,
        "cost_in_steps": (max(around) - median) / median,
        "aborted_steps": killed["aborted_steps"],
        "rebuilds_of_stage_2": len(rebuilt),
        "val_loss_clean": [e["val_loss"] for e in clean["evaluations"]],
        "val_loss_killed": [e["val_loss"] for e in killed["evaluations"]],
        "same_validation_loss": [e["val_loss"] for e in clean["evaluations"]]
        == [e["val_loss"] for e in killed["evaluations"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--emulate", type=float, default=0.1, help="--emulate-compute seconds")
    parser.add_argument("--microbatches", type=int, default=16, help="microbatches per step (M)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-kill", action="store_true", help="skip the run that loses a replica")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "replicas.json")
    args = parser.parse_args()
    config = pathlib.Path(tempfile.mkdtemp()) / "replicas.toml"
    config.write_text(f"[train]\nmicrobatches_per_step = {args.microbatches}\n")
    base = ["--stages", "4", "--steps", str(args.steps), "--emulate-compute", str(args.emulate)]
    base += ["--config", str(config)]
    variants = {
        "one peer per stage": base,
        "2 replicas": [*base, "--replicas", "2"],
        "2 replicas, one at half speed": [*base, "--replicas", "2", "--replica-slowdown", "2"],
    }
    results: dict[str, list[tuple[float, int, float]]] = {name: [] for name in variants}
    prepares: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.repeats):
        for name, flags in variants.items():
            summary = run_local(flags, timeout=1200)
            results[name].append(tokens_per_second(summary, name != "one peer per stage"))
            if (p := prepare_seconds(summary, name != "one peer per stage")) is not None:
                prepares[name].append(p)
            print(f"repeat {i + 1}: {name}: {results[name][-1][0]:.0f} tokens/s over {results[name][-1][1]} steps")
    loss = None if args.no_kill else losing_a_replica(base, args.steps)
    median = {name: statistics.median(t for t, _, _ in runs) for name, runs in results.items()}
    m = args.microbatches
    theory = {"one peer per stage": 2 * (m + 2) * args.emulate, "2 replicas": 2 * (m / 2 + 2) * args.emulate}
    efficiency = {name: [t / step for _, _, step in results[name] if step] for name, t in theory.items()}
    one = median["one peer per stage"]
    single, two = (statistics.median(prepares[k]) if prepares[k] else None for k in ("one peer per stage",
                                                                                      "2 replicas"))
    bound = transfer_bound(args.microbatches, measured_stream_rate())
    added = two - single if two is not None and single is not None else None
    combining = {"added_seconds": added, "transfer_bound": bound,
                 "over_bound": added / bound["seconds"] if added is not None else None}  # fmt: skip
    report = {
        "steps": args.steps,
        "emulate_compute": args.emulate,
        "microbatches_per_step": args.microbatches,
        "bubble_bound": (args.microbatches + 2) / (args.microbatches / 2 + 2),
        "repeats": args.repeats,
        "tokens_per_second": {name: [t for t, _, _ in runs] for name, runs in results.items()},
        "steps_measured": {name: [n for _, n, _ in runs] for name, runs in results.items()},
        "median_step_seconds": {name: [s for _, _, s in runs] for name, runs in results.items()},
        "theoretical_step_seconds": theory,
        "schedule_efficiency": efficiency,
        "two_replicas_vs_one": median["2 replicas"] / one if one else None,
        "half_speed_vs_ideal": median["2 replicas, one at half speed"] / (1.5 * one) if one else None,
        "losing_a_replica": loss,
        "prepare_seconds": {name: statistics.median(p) if p else None for name, p in prepares.items()},
        "combining": combining,
        "goals": {
            "two_replicas_vs_one": ">= 1.8",
            "half_speed_vs_ideal": ">= 0.9",
            "schedule_efficiency": ">= 0.9 (issue 17)",
            "losing_a_replica": "cost under one step time; the same validation loss as without the failure",
        },
    }
    if added is not None:
        print(f"combining partial gradients adds {added * 1000:.1f} ms to the prepare round; the transfer bound "
              f"({bound['partial_bytes'] / 2**20:.2f} MiB at {bound['stream_gib_per_s']:.2f} GiB/s) is "
              f"{bound['seconds'] * 1000:.2f} ms")  # fmt: skip
    print(
        f"2 replicas / 1: {report['two_replicas_vs_one']:.2f}x; one replica at half speed / ideal: "
        f"{report['half_speed_vs_ideal']:.2f} (the schedule's bound for 2 replicas: {report['bubble_bound']:.2f}x)"
    )
    for name, values in efficiency.items():
        print(f"{name}: theoretical step {theory[name]:.2f} s / measured: {', '.join(f'{v:.2f}' for v in values)}")
    write_results(args.out, report)


if __name__ == "__main__":
    main()
