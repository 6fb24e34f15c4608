"""One strategy against another, seed by seed, over one or more ``swarm-node bench`` results files.

Each seed's time to target under ``--strategy`` is divided by the same seed's time under ``--against`` at the
same failure rate: the seeds' large spread in time cancels, and what is left is the difference between the
two strategies. For each rate the script prints the ratios, their geometric mean with a 95 % confidence
interval (Student's t over the log ratios, so that swapping the two strategies inverts it), the seeds won
and lost, and two one-sided tests that the strategy is ahead (ratio < 1): the exact sign test and Wilcoxon's
signed-rank test over the log ratios. Files are merged by seed (for more seeds than one run holds); they
must come from the same regime with the same target loss, and a seed present twice must agree. A run of a
single interval has no variant label; it is named ``K=<its interval>`` here, like those of a sweep.

    python benchmarks/paired.py RESULTS.json [RESULTS.json ...] [--strategy ladder --variant K=1]
        [--against checkpoint --against-variant K=1] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
from typing import Any

from scipy import stats

# what must be equal for two results files' runs to be comparable
REGIME = ("step_seconds", "stage_bytes", "storage", "link_bandwidth_s", "failure_overhead_seconds")


def variant_of(run: dict[str, Any]) -> str:
    """The run's variant label; ``K=<interval>`` for a ladder or checkpoint run that was the only one."""
    if run["variant"] or "every" not in run["extra"]:
        return run["variant"]
    return f"K={run['extra']['every']}"


def load(paths: list[pathlib.Path]) -> tuple[dict[tuple[str, str, float, int], float | None], dict[str, Any]]:
    """{(strategy, variant, failure rate, seed): seconds to target} over every file, and the regime."""
    runs: dict[tuple[str, str, float, int], float | None] = {}
    regime: dict[str, Any] | None = None
    for path in paths:
        results = json.loads(path.read_text(encoding="utf-8"))
        mine = {name: results["costs"].get(name) for name in REGIME}
        mine["stage_bytes"] = (mine["stage_bytes"] or {}).get("full_state")
        mine["target_loss"] = results["target_loss"]
        if regime is not None and mine != regime:
            raise SystemExit(f"{path}: a different regime from the first file's: {mine} != {regime}")
        regime = mine
        for run in results["runs"]:
            key = (run["strategy"], variant_of(run), round(run["failure_rate"], 12), run["seed"])
            if key in runs and runs[key] != run["seconds_to_target"]:
                raise SystemExit(f"{path}: seed {key[3]} of {key[0]} {key[1]} at p={key[2]:g} differs between files")
            runs[key] = run["seconds_to_target"]
    if regime is None:
        raise SystemExit("no results files")
    return runs, regime


def compare(ratios: list[float]) -> dict[str, Any]:
    """The paired ratios' summary: geometric mean, 95 % t interval over the log ratios, arithmetic mean and
    sd, wins and the one-sided tests for ratio < 1."""
    n = len(ratios)
    logs = [math.log(r) for r in ratios]
    mean_log = statistics.fmean(logs)
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(logs) / math.sqrt(n) if n > 1 else math.inf
    below = sum(r < 1 for r in ratios)
    above = sum(r > 1 for r in ratios)
    sign = stats.binomtest(below, below + above, 0.5, alternative="greater").pvalue if below + above else 1.0
    diffs = [x for x in logs if x != 0]
    wilcoxon = stats.wilcoxon(diffs, alternative="less").pvalue if diffs else 1.0
    return {"seeds": n, "ratios": ratios, "geometric_mean": math.exp(mean_log),
            "ci95": [math.exp(mean_log - half), math.exp(mean_log + half)], "mean": statistics.fmean(ratios),
            "sd": statistics.stdev(ratios) if n > 1 else 0.0, "ahead": below, "behind": above,
            "sign_test_p": float(sign), "wilcoxon_p": float(wilcoxon)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=pathlib.Path)
    parser.add_argument("--strategy", default="ladder")
    parser.add_argument("--variant", default="K=1")
    parser.add_argument("--against", default="checkpoint")
    parser.add_argument("--against-variant", default="K=1")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = parser.parse_args()
    runs, regime = load(args.results)
    rates = sorted({rate for (s, v, rate, _) in runs if (s, v) == (args.strategy, args.variant)})
    if not rates:
        raise SystemExit(f"no runs of {args.strategy} {args.variant} in these files")
    out: dict[str, Any] = {"strategy": f"{args.strategy} {args.variant}".strip(),
                           "against": f"{args.against} {args.against_variant}".strip(), "regime": regime, "rates": {}}
    for rate in rates:
        seeds = sorted(seed for (s, v, r, seed) in runs if (s, v, r) == (args.strategy, args.variant, rate))
        pairs = [(runs[(args.strategy, args.variant, rate, seed)],
                  runs.get((args.against, args.against_variant, rate, seed))) for seed in seeds]  # fmt: skip
        if any(a is None or b is None for a, b in pairs):
            out["rates"][f"{rate:g}"] = {"error": "a run without time to target, or without its pair"}
            continue
        out["rates"][f"{rate:g}"] = compare([a / b for a, b in pairs]) | {"seed_ids": seeds}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{out['strategy']} ÷ {out['against']}, paired per seed")
    for rate, row in out["rates"].items():
        if "error" in row:
            print(f"  p={rate}: {row['error']}")
            continue
        lo, hi = row["ci95"]
        print(f"  p={rate}: {row['seeds']} seeds, geometric mean {row['geometric_mean']:.4f} "
              f"(95 % CI {lo:.4f}–{hi:.4f}),"
              f" ahead on {row['ahead']}, behind on {row['behind']}; one-sided sign test p = {row['sign_test_p']:.3g},"
              f" Wilcoxon p = {row['wilcoxon_p']:.3g}")  # fmt: skip
        print("    " + " ".join(f"{r:.4f}" for r in row["ratios"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
