"""Prometheus metrics: what one scrape costs, and training throughput with metrics on versus off.

Runs ``swarm-node local --stages 4 --steps N`` alternately with ``--metrics`` and ``--no-metrics``. During
each metrics-on run it scrapes every daemon's ``/metrics`` (found through ``--prometheus-dir``'s
targets.json) ``--scrapes`` times and reports the median and p90 latency and the exposition size.
Goal: no measurable throughput difference.

    python benchmarks/metrics_overhead.py [--steps 40] [--repeats 2] [--scrapes 100]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time
import urllib.request

from _common import RESULTS, LocalSwarm, local_swarm, write_results


def run(steps: int, metrics: bool, scrapes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        prom = pathlib.Path(tmp) / "prom"
        flags = ["--stages", "4", "--steps", str(steps), "--metrics" if metrics else "--no-metrics",
                 "--prometheus-dir", str(prom)]  # fmt: skip
        with local_swarm(flags) as swarm:
            latencies, sizes = scrape(swarm, prom, scrapes) if metrics else ([], [])
            summary = swarm.summary(timeout=900)
    return {
        "tokens_per_second": summary["tokens_per_second"],
        "step_seconds_median": statistics.median(summary["step_seconds"][5:]),
        "scrape_seconds": latencies,
        "exposition_bytes": statistics.median(sizes) if sizes else None,
    }


def scrape(swarm: LocalSwarm, prom: pathlib.Path, scrapes: int) -> tuple[list[float], list[int]]:
    """Scrapes every daemon listed in ``prom``/targets.json ``scrapes`` times: (latencies, body sizes)."""
    latencies, sizes = [], []
    targets: list[str] = []
    deadline = time.monotonic() + 180
    while len(targets) < 4 and time.monotonic() < deadline and swarm.running():
        time.sleep(1)
        path = prom / "targets.json"
        if path.exists():
            targets = [t for entry in json.loads(path.read_text()) for t in entry["targets"]]
    for _ in range(scrapes):
        for target in targets:
            started = time.perf_counter()
            try:
                body = urllib.request.urlopen(f"http://{target}/metrics", timeout=5).read()
            except OSError:
                continue
            latencies.append(time.perf_counter() - started)
            sizes.append(len(body))
        time.sleep(0.05)
    return latencies, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scrapes", type=int, default=100, help="scrapes of every daemon per metrics-on run")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "metrics_overhead.json")
    args = parser.parse_args()
    on, off = [], []
    for _ in range(args.repeats):
        on.append(run(args.steps, True, args.scrapes))
        off.append(run(args.steps, False, 0))
    scrapes = sorted(s for r in on for s in r["scrape_seconds"])
    report = {
        "steps": args.steps,
        "repeats": args.repeats,
        "scrape_seconds_median": statistics.median(scrapes),
        "scrape_seconds_p90": scrapes[int(0.9 * (len(scrapes) - 1))],
        "scrapes": len(scrapes),
        "exposition_bytes": statistics.median(r["exposition_bytes"] for r in on),
        "tokens_per_second_metrics_on": [r["tokens_per_second"] for r in on],
        "tokens_per_second_metrics_off": [r["tokens_per_second"] for r in off],
        "step_seconds_median_on": statistics.median(r["step_seconds_median"] for r in on),
        "step_seconds_median_off": statistics.median(r["step_seconds_median"] for r in off),
    }
    report["throughput_on_over_off"] = statistics.median(report["tokens_per_second_metrics_on"]) / statistics.median(
        report["tokens_per_second_metrics_off"]
    )
    print(
        f"scrape: median {report['scrape_seconds_median'] * 1e3:.1f} ms, "
        f"p90 {report['scrape_seconds_p90'] * 1e3:.1f} ms "
        f"({report['exposition_bytes'] / 1024:.0f} KiB) over {len(scrapes)} scrapes during training\n"
        f"throughput: metrics on {report['tokens_per_second_metrics_on']} vs off "
        f"{report['tokens_per_second_metrics_off']} tokens/s (on/off {report['throughput_on_over_off']:.3f})"
    )
    write_results(args.out, report)


if __name__ == "__main__":
    main()
