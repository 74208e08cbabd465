"""`svd-fast demo --distill`'s distillation and evaluation on an existing demo output folder (its trained pipeline,
manifest and summary.json), without rerunning the demo's other stages: for bench/RESULTS.md.

    python bench/demo_distill.py --demo DEMO_OUT --out OUT [--seed N] [--distill-steps N]

Writes OUT/summary.json: {"distilled": ...} as the demo's summary.json has it, with the stage seconds and load.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from svd_fast.demo import DemoSettings, StageTimer, distill, outputs, world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="a finished `svd-fast demo` output folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, help="default: the demo's seed")
    parser.add_argument("--distill-steps", type=int)
    args = parser.parse_args()
    demo = json.loads((args.demo / "summary.json").read_text())
    settings = DemoSettings(**{key: value for key, value in demo["settings"].items() if key in DemoSettings.__dataclass_fields__})
    if args.distill_steps:
        settings = replace(settings, distill_steps=args.distill_steps)
    seed = demo["seed"] if args.seed is None else args.seed
    buckets = demo["motion_buckets"]
    held_out = world.held_out_specs(settings.held_out, settings.num_frames, settings.size, settings.speeds, seed)
    timer = StageTimer(lambda line: print(f"[demo_distill] {line}", flush=True))
    started = time.perf_counter()
    with timer.stage("distill"):
        result = distill.distill_student(args.demo / "pipeline", args.demo / "manifest.parquet", args.out / "distill", settings.distillation(), seed)
    with timer.stage("evaluate"):
        distilled, _ = distill.evaluate_student(result.export_path, args.demo / "pipeline", held_out, buckets, settings.speeds,
                                                settings.sampling(), settings.student_steps, seed, print)  # fmt: skip
    distilled["distill_seconds"] = timer.seconds["distill"]
    distilled["distill_cpu_seconds"] = timer.cpu_seconds["distill"]
    summary = {"distilled": distilled, "seed": seed, "settings": settings.distillation(), "stage_seconds": timer.seconds,
               "stage_cpu_seconds": timer.cpu_seconds, "wall_seconds": round(time.perf_counter() - started, 1),
               "load_average": list(os.getloadavg())}  # fmt: skip
    outputs.write_json(args.out / "summary.json", summary)
    print(json.dumps({k: v for k, v in distilled.items() if k != "evaluation"}, indent=1))


if __name__ == "__main__":
    main()
