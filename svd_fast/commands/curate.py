"""`svd-fast curate`: transitions, motion / OCR / CLIP scores and filters into a resumable Parquet manifest."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from svd_fast.commands.errors import (
    EXIT_PARTIAL,
    UsageError,
    require,
    require_device,
    require_output_folder,
    require_readable_file,
    require_writable_dir,
)

EXAMPLES = """examples:
  svd-fast curate --input videos/ --out manifest.parquet
  svd-fast curate --input list.txt --out m.parquet --filter "flow_mean_norm>=0.002" --filter "ocr_coverage<=0.05"
  svd-fast curate --input videos/ --out m.parquet --clip-model models/clip --aesthetic-head head.pt \\
      --filter "aesthetic_score:bottom=12.5" --filter "clip_text_similarity:bottom=25"
  svd-fast curate --input videos/ --out m.parquet --report report/     # + report/index.html for curators
  svd-fast curate --input videos/ --out m.parquet --ray local          # Ray Data stages on this machine
  svd-fast curate --input videos/ --out m.parquet --ray auto           # join a running Ray cluster
A list file has one video path per line, optionally followed by a TAB and a caption; a directory is searched
for video files (.mp4 .webm .avi .mkv .mov .m4v). Static clips get keep=False unless --keep-static.
Rerunning with the same --out skips files already finished with the same content and settings (their rows
live in MANIFEST.parts/); one run at a time per --out. Exit code 1: some files failed (see the error column).
Filters: COLUMN>=X, COLUMN<=X, COLUMN>X, COLUMN<X, COLUMN:bottom=P (drop the lowest P%), COLUMN:top=P."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "curate",
        help="curate a video dataset into a Parquet manifest (transitions, motion, OCR, CLIP scores, filters)",
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
    parser.add_argument("--cut-threshold", type=float, default=27.0, help="content score (HSV mean abs diff, 0..255) for a transition")
    parser.add_argument("--min-scene-frames", type=int, default=8, help="shortest scene between transitions, in frames (>= 1)")
    parser.add_argument("--flow-fps", type=float, default=2.0, help="rate (in time) at which optical flow is sampled")
    parser.add_argument("--flow-backend", choices=("auto", "opencv", "torch", "dali"), default="auto",
                        help="optical flow: auto (opencv on CPU, torch on CUDA), OpenCV Farneback, PyTorch Farneback, DALI (untested)")
    parser.add_argument("--static-threshold", type=float, default=1e-3, help="flow_mean_norm below this marks a clip static")
    parser.add_argument("--keep-static", action="store_true", help="keep static clips (default: keep=False for them)")
    parser.add_argument("--no-codec-prefilter", action="store_true", help="always compute dense flow, even where codec motion vectors say static")
    parser.add_argument("--report", default=None, metavar="DIR", help="also write DIR/index.html (+ PNGs): score histograms, kept/dropped counts, contact sheets")
    parser.add_argument("--device", default=None, help="torch device for transitions, flow and CLIP (default: cuda if present)")
    parser.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from svd_fast.curation import CurationConfig  # noqa: PLC0415 - keep `svd-fast --help` fast

    try:
        return CurationConfig(
            cut_threshold=args.cut_threshold,
            min_scene_frames=args.min_scene_frames,
            flow_fps=args.flow_fps,
            flow_backend=args.flow_backend,
            static_threshold=args.static_threshold,
            drop_static=not args.keep_static,
            codec_static_prefilter=not args.no_codec_prefilter,
            ocr=not args.no_ocr,
            clip_model=args.clip_model,
            aesthetic_head=args.aesthetic_head,
            device=args.device,
        )
    except ValueError as error:
        # CurationConfig's messages start with the field's name: say it as the option the user typed.
        field, _, rest = str(error).partition(" ")
        raise UsageError(f"--{field.replace('_', '-')} {rest}", "see `svd-fast curate --help`") from None


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # noqa: PLC0415 - tqdm loads only when curation runs (fast --help)

    from svd_fast.curation import CurationRequestError, ManifestBusyError, curate  # noqa: PLC0415 - torch and OpenCV load only when curation runs

    require("flow_fps", args.flow_fps)
    if args.device is not None:
        require_device(args.device)
    if args.ray is not None and args.ray not in ("local", "auto") and not re.fullmatch(r"(ray://)?[\w.-]+:\d+", args.ray):
        raise UsageError(f"--ray must be local, auto or a cluster address HOST:PORT, got {args.ray!r}")
    config = _config(args)
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory", "give a file name such as manifest.parquet")
    require_writable_dir("--out folder", out.absolute().parent)
    if args.clip_model is not None and not Path(args.clip_model).is_dir():
        raise UsageError(f"--clip-model {args.clip_model} is not a folder", "give a local CLIPModel folder (transformers format)")
    if args.aesthetic_head is not None:
        require_readable_file("--aesthetic-head", args.aesthetic_head)
    if args.report is not None:
        require_output_folder("--report", args.report, "report", [args.input, out])
    # stdout carries only the JSON summary; progress goes to stderr, in a bar opened at the first finished file so
    # that a request curate() refuses is still one line.
    bars: list = []

    def progress(message: str) -> None:
        if not bars:
            bars.append(tqdm(desc="svd-fast curate", unit="file", file=sys.stderr, dynamic_ncols=True))
        bars[0].set_postfix_str(message.removeprefix("done "), refresh=False)
        bars[0].update(1)

    try:
        summary = curate(args.input, out, config, filters=args.filters, ray_address=args.ray, progress=progress)
    except CurationRequestError as error:
        raise UsageError(str(error), "see `svd-fast curate --help`") from None
    except ManifestBusyError as error:
        raise UsageError(str(error), "wait for it to finish, or choose another --out") from None
    finally:
        for bar in bars:
            bar.close()
    summary.pop("config")
    if args.report is not None:
        from svd_fast.curation.report import write_report  # noqa: PLC0415 - matplotlib only for the report

        summary["report"] = str(write_report(out, args.report))
    print(json.dumps(summary, indent=2))
    if summary["files_failed"]:
        print(f"svd-fast curate: {summary['files_failed']} of {summary['files']} files failed (their error is in {out})", file=sys.stderr)
        return EXIT_PARTIAL
    return 0
