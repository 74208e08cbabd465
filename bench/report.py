"""pytest-benchmark JSON -> markdown table for bench/RESULTS.md.

Usage: python bench/report.py RUN.json [--baseline torch-eager]

Columns: benchmark name, median ms, achieved GB/s and fraction of the measured copy bandwidth
(both from the `timed` fixture's extra_info, when the benchmark recorded bytes_moved), and the
speed-up over the baseline variant of the same group (median of baseline / median of this row;
> 1 means faster than the baseline). The baseline of a group is the row whose extra_info
"variant" (or name) contains the --baseline text.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def _variant(bench: dict) -> str:
    return str(bench.get("extra_info", {}).get("variant", bench["name"]))


def _baseline_medians(benchmarks: list[dict], baseline: str) -> dict[str, float]:
    medians: dict[str, float] = {}
    for bench in benchmarks:
        if baseline in _variant(bench):
            medians.setdefault(str(bench.get("group")), bench["stats"]["median"])
    return medians


def _format(value: object, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(run: dict, baseline: str = "torch-eager") -> str:
    benchmarks = run.get("benchmarks", [])
    if not benchmarks:
        raise ValueError("the JSON holds no benchmarks (was the run made with --benchmark-only and -json?)")
    baselines = _baseline_medians(benchmarks, baseline)
    by_group: dict[str, list[dict]] = defaultdict(list)
    for bench in benchmarks:
        by_group[str(bench.get("group"))].append(bench)
    lines = [
        f"| name | median ms | GB/s | fraction of copy bw | speed-up vs {baseline} |",
        "|---|---:|---:|---:|---:|",
    ]
    for group in sorted(by_group):
        for bench in sorted(by_group[group], key=lambda b: b["stats"]["median"]):
            info = bench.get("extra_info", {})
            median = bench["stats"]["median"]
            reference = baselines.get(group)
            ratio = None if reference is None else reference / median
            lines.append(
                f"| {bench['name']} | {median * 1e3:.3f} | {_format(info.get('achieved_gbps'), 1)} | "
                f"{_format(info.get('fraction_of_copy_bandwidth'), 3)} | {_format(ratio, 2)} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path", type=Path, help="output of pytest --benchmark-json")
    parser.add_argument("--baseline", default="torch-eager", help="variant the speed-up column is relative to")
    args = parser.parse_args(argv)
    run = json.loads(args.json_path.read_text())
    print(markdown_table(run, args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
