"""`svd-fast encode`: precompute the training features of every clip (VAE posterior of each frame, CLIP embedding
of the first frame) so that training runs without the per-frame VAE encode and the image encoder in its loop.
Resumable: rerun the same command after an interruption; finished sources are kept. Each source (file or manifest
row) is one job: in this process, or spread over Ray Data actors with --ray (local: start Ray here; auto: join
the running cluster), each holding the VAE and image encoder (one GPU each where the cluster has GPUs); both
write the same files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from svd_fast import _io
from svd_fast._ray import rows_from_actors
from svd_fast.commands.errors import UsageError, require, require_device, require_output_folder

EXAMPLES = """examples:
  svd-fast encode --data data/manifest.parquet --model models/svd-xt --variant fp16 --out latents/xt \\
      --num-frames 25 --height 576 --width 1024 --target-fps 7
  svd-fast encode --data data/manifest.parquet --model models/svd-xt --out latents/xt --num-frames 25 --ray auto
  svd-fast train --config configs/train_svd_xt_25x576x1024_8gpu_zero2.yaml --set latents_dir=latents/xt
Writes OUT/settings.json, OUT/clips/clip_SSSSSSSS_NNNN.pt (clip N of source S), OUT/sources/source_SSSSSSSS.json
when a source is done and, when every source is done, OUT/complete.json.
A training config reads it with latents_dir: OUT (its num_frames, height and width must match)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("encode", help="precompute training latents and CLIP embeddings of video clips",
                                   description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="video folder, video file or curated manifest (.parquet/.jsonl)")
    parser.add_argument("--model", required=True, help="diffusers SVD pipeline folder (its VAE and image encoder)")
    parser.add_argument("--variant", default=None, help='weights variant to read, e.g. "fp16" for a folder of *.fp16.safetensors')
    parser.add_argument("--out", required=True, help="output folder (resumable)")
    parser.add_argument("--num-frames", type=int, default=14)
    parser.add_argument("--height", type=int, default=576)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=None, help="take every STRIDE-th frame")
    parser.add_argument("--target-fps", type=float, default=None, help="resample clips to this frame rate")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--ray", default=None, choices=("auto", "local"),
                        help="encode with Ray Data actors: 'local' starts Ray here, 'auto' joins the running cluster")
    parser.add_argument("--actors", type=int, default=None, help="with --ray: number of actors (default: the cluster's GPUs, else 2)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("num_frames", "height", "width", "stride", "target_fps", "actors"):
        require(name, getattr(args, name))
    if args.height % 8 or args.width % 8:
        raise UsageError(f"--height and --width must be multiples of 8, got {args.height}x{args.width}")
    if args.stride is not None and args.target_fps is not None:
        raise UsageError("give --stride or --target-fps, not both")
    if not Path(args.data).exists():
        raise UsageError(f"--data {args.data} does not exist", "check the path")
    if not Path(args.model).is_dir():
        raise UsageError(f"--model {args.model} is not a diffusers pipeline folder", "check the path")
    if args.variant is not None:
        from svd_fast.diffusers.loading import ModelFolderError, check_variant  # noqa: PLC0415 - svd_fast.diffusers imports diffusers, loaded only when the command runs

        try:
            check_variant(Path(args.model), args.variant)
        except ModelFolderError as error:
            raise UsageError(str(error)) from None
    device = require_device(args.device)
    out = require_output_folder("--out", args.out, "latents", [args.data, args.model])

    from svd_fast.training.latents import finish_latents_dir, prepare_latents_dir  # noqa: PLC0415 - torch and diffusers load only when the command runs

    settings = {"data": str(Path(args.data).resolve()), "model": str(Path(args.model).resolve()), "num_frames": args.num_frames,
                "height": args.height, "width": args.width, "stride": args.stride, "target_fps": args.target_fps}
    if args.variant is not None:  # only then: folders encoded before the option existed keep their settings
        settings["model_variant"] = args.variant
    _io.claim_folder(out, "latents", [args.data, args.model])
    try:
        with _io.lock(out / ".svd-fast-lock", "encode run", out):
            pending = prepare_latents_dir(out, settings)
            if pending:
                (_encode_ray if args.ray else _encode_local)([{"source": index} for index in pending], settings, out, device, args)
            clips, skipped = finish_latents_dir(out)
    except _io.OutputBusyError as error:
        raise UsageError(str(error), "wait for it to finish, or choose another --out") from None
    except ConnectionError as error:  # ray.init(address="auto") without a cluster
        raise UsageError(f"--ray {args.ray}: no running Ray cluster to join ({str(error).splitlines()[0]})",
                         "start one with `ray start --head`, or use --ray local") from None
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(json.dumps({"out": str(out), "clips": clips, "encoded_sources": len(pending), "skipped": skipped}))
    return 0


def _encode_local(jobs: list[dict], settings: dict, out: Path, device: str, _args: argparse.Namespace) -> None:
    from svd_fast.training.latents import ClipEncoder  # noqa: PLC0415 - torch and diffusers load only when the command runs

    encoder = ClipEncoder(settings, str(out), device)
    for job in jobs:
        encoder(job)


def _encode_ray(jobs: list[dict], settings: dict, out: Path, device: str, args: argparse.Namespace) -> None:
    from svd_fast.training.latents import ClipEncoder  # noqa: PLC0415 - torch and diffusers load only when the command runs

    def encoder_options(cluster_has_gpus: bool) -> dict:
        return {"settings": settings, "out": str(out), "device": "cuda" if cluster_has_gpus else device}

    for row in rows_from_actors(jobs, ClipEncoder, encoder_options, args.ray, args.actors):  # each source's files are on disk when its row arrives
        print(f"source {row['source']}: {row['clips']} clip(s)" + (f" ({row['error']})" if row["error"] else ""), file=sys.stderr)
