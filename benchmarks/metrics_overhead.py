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
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(steps: int, metrics: bool, scrapes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out, prom = pathlib.Path(tmp) / "summary.json", pathlib.Path(tmp) / "prom"
        cmd = [sys.executable, "-m", "node", "local", "--stages", "4", "--steps", str(steps), "--quiet",
               "--workdir", str(pathlib.Path(tmp) / "swarm"), "--json-out", str(out),
               "--metrics" if metrics else "--no-metrics", "--prometheus-dir", str(prom)]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=REPO)
        latencies, sizes = [], []
        if metrics:
            targets: list[str] = []
            deadline = time.monotonic() + 180
            while len(targets) < 4 and time.monotonic() < deadline and proc.poll() is None:
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
        proc.wait(timeout=900)
        summary = json.loads(out.read_text())
    return {
        "tokens_per_second": summary["tokens_per_second"],
        "step_seconds_median": statistics.median(summary["step_seconds"][5:]),
        "scrape_seconds": latencies,
        "exposition_bytes": statistics.median(sizes) if sizes else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scrapes", type=int, default=100, help="scrapes of every daemon per metrics-on run")
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks/results/metrics_overhead.json")
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
