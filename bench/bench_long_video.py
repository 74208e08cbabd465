"""Seams of long videos on the demo world (issue #28): N frames from the trained demo pipeline in windows of its
W frames, naive chaining against overlapping windows, measured on the disk's centroid track.

    PYTHONPATH=$PWD python bench/bench_long_video.py --demo DEMO_OUT [--frames 24] [--clips 4] [--json OUT.json]

DEMO_OUT is an `svd-fast demo` output folder (summary.json + pipeline/). Each held-out first frame of the demo
(its colour sets the trained direction) is animated at the low motion bucket (the slow disk stays in the frame
for 24 frames) with every configuration; per video:

* per-frame displacement of the centroid (svd_fast.demo.evaluate.centroid_track), split into transitions at a
  seam (from the last frame before a window's shared frames to the first frame after them: for naive chaining
  the repeated frame and the frame after it) and transitions inside windows;
* seam ratio: each seam transition's displacement over the median inside windows (target: within 1.5x, i.e.
  in [1/1.5, 1.5]: a jump or a stall);
* direction error: angle between the first-to-last displacement and the colour's direction (target <= 30 deg).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

# (name, overlap, hold): naive chaining; overlap with the shared frames only cross-faded; held and cross-faded.
CONFIGS = (("naive", 0, 0.0), ("overlap 2, blend only", 2, 0.0), ("overlap 2, held", 2, 1.0))
SEAM_LIMIT = 1.5
ANGLE_LIMIT = 30.0


def seam_transitions(num_frames: int, window: int, overlap: int) -> set[int]:
    """Transitions t -> t + 1 that touch a seam: from the frame before each window's shared frames to the first
    frame after them (naive chaining: the repeated first frame and the one after it)."""
    from svd_fast.sampling.long_video import window_starts

    starts = window_starts(num_frames, window, overlap)
    seams: set[int] = set()
    for previous, start in zip(starts, starts[1:]):
        shared = previous + window - start
        seams.update(range(start - 1, start + shared + 1) if shared else (start - 1, start))
    return {t for t in seams if 0 <= t < num_frames - 1}


def measure(track: list, colour: str, seams: set[int]) -> dict:
    from svd_fast.demo.evaluate import motion_of

    steps = {t: math.dist(track[t], track[t + 1]) for t in range(len(track) - 1) if track[t] is not None and track[t + 1] is not None}
    inside = [d for t, d in steps.items() if t not in seams]
    median_inside = statistics.median(inside) if inside else float("nan")
    ratios = [steps[t] / median_inside for t in sorted(seams) if t in steps and median_inside > 0]
    _, angle = motion_of(track, colour)
    return {
        "median_inside_px": round(median_inside, 3),
        "seam_ratios": [round(r, 2) for r in ratios],
        "max_seam_ratio": round(max(ratios), 2) if ratios else None,
        "min_seam_ratio": round(min(ratios), 2) if ratios else None,
        "angle_error_deg": angle,
        "frames_without_disk": sum(point is None for point in track),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="svd-fast demo output folder (summary.json, pipeline/)")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--clips", type=int, default=4, help="held-out first frames (the demo's own, in order)")
    parser.add_argument("--json", type=Path, help="write the per-video measurements here (atomically)")
    args = parser.parse_args()

    import torch
    from PIL import Image

    from svd_fast.demo import evaluate, outputs, world
    from svd_fast.diffusers.generation import load_optimized_pipeline
    from svd_fast.diffusers.long_video import generate_long_video

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    summary = json.loads((args.demo / "summary.json").read_text())
    settings, seed = summary["settings"], summary["seed"]
    bucket = summary["motion_buckets"]["low"]
    size, window = settings["size"], settings["num_frames"]
    held_out = world.held_out_specs(args.clips, window, size, settings["speeds"], seed)
    pipe = load_optimized_pipeline(args.demo / "pipeline", progress=False)
    started = time.perf_counter()
    rows = []
    for name, overlap, hold in CONFIGS:
        seams = seam_transitions(args.frames, window, overlap)
        for index, spec in enumerate(held_out):
            first = world.render(spec, 1, size)[0]
            frames = generate_long_video(
                pipe, Image.fromarray(first), args.frames, window=window, overlap=overlap, hold=hold, seed=seed + index,
                output_type="np", height=size, width=size, num_inference_steps=settings["sample_steps"],
                min_guidance_scale=settings["guidance"], max_guidance_scale=settings["guidance"], fps=settings["fps"],
                motion_bucket_id=bucket, noise_aug_strength=settings["noise_aug_strength"],
            )  # fmt: skip
            frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
            track = evaluate.centroid_track(frames, spec.colour)
            rows.append({"config": name, "overlap": overlap, "hold": hold, "clip": spec.name, "colour": spec.colour,
                         "track": track, **measure(track, spec.colour, seams)})  # fmt: skip
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "track"}), flush=True)
    seconds = round(time.perf_counter() - started, 1)

    print(f"\n{args.frames} frames, windows of {window}, motion bucket {bucket} (low), {args.clips} held-out first frames, "
          f"{settings['sample_steps']} steps; {seconds} s; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| config | median px/frame inside windows | seam ratio: median of per-video max (worst) | min seam ratio (worst) "
          "| videos with all seams within 1.5x | direction error median (max) | videos <= 30 deg |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, *_ in CONFIGS:
        group = [r for r in rows if r["config"] == name]
        maxima = [r["max_seam_ratio"] for r in group if r["max_seam_ratio"] is not None]
        minima = [r["min_seam_ratio"] for r in group if r["min_seam_ratio"] is not None]
        angles = [180.0 if r["angle_error_deg"] is None else r["angle_error_deg"] for r in group]
        within = sum(r["max_seam_ratio"] is not None and r["max_seam_ratio"] <= SEAM_LIMIT and r["min_seam_ratio"] >= 1 / SEAM_LIMIT for r in group)
        print(
            f"| {name} | {statistics.median(r['median_inside_px'] for r in group):.2f} | "
            f"{statistics.median(maxima):.2f} ({max(maxima):.2f}) | {statistics.median(minima):.2f} ({min(minima):.2f}) | "
            f"{within}/{len(group)} | {statistics.median(angles):.1f} ({max(angles):.1f}) | "
            f"{sum(a <= ANGLE_LIMIT for a in angles)}/{len(group)} |"
        )
    if args.json is not None:
        record = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "seconds": seconds, "load_average": os.getloadavg(),
                  "frames": args.frames, "window": window, "bucket": bucket, "rows": rows}  # fmt: skip
        outputs.write_json(args.json, record)


if __name__ == "__main__":
    main()
