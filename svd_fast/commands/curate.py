"""`svd-fast curate`: cut detection, motion / OCR / CLIP scores and filters into a resumable Parquet manifest."""

from __future__ import annotations

import argparse
import json

EXAMPLES = """examples:
  svd-fast curate --input videos/ --out manifest.parquet
  svd-fast curate --input list.txt --out m.parquet --filter "flow_mean_norm>=0.001" --filter "ocr_coverage<=0.05"
  svd-fast curate --input videos/ --out m.parquet --clip-model models/clip --aesthetic-head head.pt \\
      --filter "aesthetic_score:bottom=12.5" --filter "clip_text_similarity:bottom=25"
  svd-fast curate --input videos/ --out m.parquet --ray local          # Ray Data stages on this machine
  svd-fast curate --input videos/ --out m.parquet --ray auto           # join a running Ray cluster
A list file has one video path per line, optionally followed by a TAB and a caption.
Rerunning with the same --out skips finished files (their rows live in MANIFEST.parts/).
Filters: COLUMN>=X, COLUMN<=X, COLUMN>X, COLUMN<X, COLUMN:bottom=P (drop the lowest P%), COLUMN:top=P."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "curate",
        help="curate a video dataset into a Parquet manifest (cuts, motion, OCR, CLIP scores, filters)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="directory of videos, or a list file (path[TAB caption] per line)")
    parser.add_argument("--out", required=True, help="manifest Parquet file to write (MANIFEST.parts/ holds per-file results)")
    parser.add_argument("--filter", action="append", default=[], dest="filters", metavar="SPEC", help="a filter (repeatable), see below")
    parser.add_argument("--ray", default=None, metavar="ADDRESS", help="run as Ray Data stages: 'local' starts Ray here, else a cluster address")
    parser.add_argument("--clip-model", default=None, help="local CLIPModel folder (transformers format); CLIP scores are skipped without it")
    parser.add_argument("--aesthetic-head", default=None, help="state-dict file of a linear/MLP head over CLIP image embeddings")
    parser.add_argument("--no-ocr", action="store_true", help="skip OCR text coverage")
    parser.add_argument("--cut-threshold", type=float, default=27.0, help="content score (HSV mean abs diff, 0..255) for a cut")
    parser.add_argument("--min-scene-frames", type=int, default=8, help="shortest scene, in frames")
    parser.add_argument("--flow-fps", type=float, default=2.0, help="frame rate at which optical flow is computed")
    parser.add_argument("--flow-backend", choices=("auto", "torch", "dali"), default="auto", help="optical flow: DALI hardware flow or PyTorch Lucas-Kanade")
    parser.add_argument("--static-threshold", type=float, default=1e-3, help="flow_mean_norm below this marks a clip static")
    parser.add_argument("--codec-static-prefilter", action="store_true", help="clips whose codec motion vectors are all zero skip dense flow")
    parser.add_argument("--device", default=None, help="torch device for cut detection, flow and CLIP (default: cuda if present)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from svd_fast.curation import CurationConfig, curate  # noqa: PLC0415 - keep `svd-fast --help` fast

    config = CurationConfig(
        cut_threshold=args.cut_threshold,
        min_scene_frames=args.min_scene_frames,
        flow_fps=args.flow_fps,
        flow_backend=args.flow_backend,
        static_threshold=args.static_threshold,
        codec_static_prefilter=args.codec_static_prefilter,
        ocr=not args.no_ocr,
        clip_model=args.clip_model,
        aesthetic_head=args.aesthetic_head,
        device=args.device,
    )
    summary = curate(args.input, args.out, config, filters=args.filters, ray_address=args.ray, progress=print)
    summary.pop("config")
    print(json.dumps(summary, indent=2))
    return 0
