"""`svd-fast demo`: a small SVD that visibly learns, end to end, on a CPU in minutes.

Synthetic clips with known ground truth (red disks move right, blue disks move down, slowly or fast; plus
static clips and clips joined by hard cuts) -> curation (static clips dropped, cuts split, motion_bucket_id from
the motion score) -> a small temporal-decoder VAE trained on the frames -> a small SVD UNet trained under
DeepSpeed ZeRO-2 with the SVD objective -> videos from held-out first frames at the low and high motion bucket,
measured against the ground truth (direction, distance, PSNR). See svd_fast/demo/.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

from svd_fast import checks
from svd_fast.commands.errors import UsageError, require, require_output_folder

EXAMPLES = """examples:
  svd-fast demo --out demo_out            # the full demo: minutes on a 2-core CPU
  svd-fast demo --out demo_quick --quick  # every stage and output in under two minutes (does not learn)
  svd-fast demo --out demo_out --distill  # also a 4-step consistency student, evaluated like the teacher
  svd-fast demo --out demo_seeds --seeds 0-4  # five full runs, one after another; summary.json: seed_table
  svd-fast generate --model demo_out/pipeline --image demo_out/first_frame.png --out disk.mp4 \\
      --motion-bucket-id N --fps 8 --steps 12 --min-guidance 1 --max-guidance 1   # N: summary.json motion_buckets
outputs in OUT: generated_slow.mp4, generated_fast.mp4, reference_slow.mp4, reference_fast.mp4, first_frame.png,
  comparison.png, motion.png, loss.png, manifest.parquet, summary.json (evaluation per held-out first frame), pipeline/
  (the trained pipeline, diffusers format), work/ (training clips, base model, checkpoints)"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="curate -> train a small SVD -> generate learned motion, on the CPU in minutes",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder, new or empty (default: demo_out)")
    parser.add_argument("--quick", action="store_true", help="every stage with a few steps each: checks the system, does not learn")
    parser.add_argument("--unet-steps", type=int, help="UNet training steps (default: 1100; --quick: 3)")
    parser.add_argument("--sample-steps", type=int, help="sampling steps per video (default: 12; --quick: 2)")
    parser.add_argument("--seed", type=int, help="seed for data, weights and sampling (default: 0)")
    parser.add_argument("--seeds", help="full runs at several seeds one after another, e.g. 0-4 or 0,2,5: the first seed's outputs in OUT, "
                        "each other seed's in OUT/seed_N; OUT/summary.json adds seed_table (every seed's targets)")
    parser.add_argument("--distill", action="store_true",
                        help="also distill the trained UNet into a 4-step consistency student and evaluate it (summary.json: distilled)")
    parser.set_defaults(func=run)


def check_out(out: Path) -> None:
    """A new folder, or an empty one: the demo never mixes its outputs with an earlier run's."""
    require_output_folder("--out", out, "demo")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file", "pass a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} exists and is not empty", "pass a new folder, or remove this one")


def run(args: argparse.Namespace) -> int:
    for name in ("unet_steps", "sample_steps", "seed"):
        require(name, getattr(args, name))
    seeds = [0 if args.seed is None else args.seed]
    if args.seeds is not None:
        if args.seed is not None:
            raise UsageError("--seed and --seeds together", "pass one of them")
        try:
            seeds = checks.parse_seed_list(args.seeds, spelled="--seeds")
        except checks.CheckError as error:
            raise UsageError(str(error)) from None
    check_out(args.out)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from svd_fast.demo import QUICK, DemoSettings, run_seeds  # noqa: PLC0415 - torch, diffusers and deepspeed load only when the demo runs

    settings = QUICK if args.quick else DemoSettings()
    overrides = {"unet_steps": args.unet_steps, "sample_steps": args.sample_steps, "distill": args.distill or None}
    settings = replace(settings, **{key: value for key, value in overrides.items() if value is not None})
    summary = run_seeds(args.out, settings, seeds, lambda line: print(f"[svd-fast demo] {line}", flush=True))
    shown = {key: summary[key] for key in ("stage_seconds", "evaluation_summary", "seed_table") if key in summary}
    if "distilled" in summary:
        shown["distilled"] = {key: value for key, value in summary["distilled"].items() if key != "evaluation"}
    print(json.dumps(shown, indent=2))
    print(f"[svd-fast demo] outputs in {args.out}/ (comparison.png, generated_*.mp4, loss.png, summary.json, pipeline/)")
    return 0
