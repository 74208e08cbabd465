"""`svd-fast generate`: image-to-video with an SVD / SVD-XT diffusers pipeline, optimized by svd_fast.

One image (``--image IMG --out OUT``) or a batch (``--input DIR_OR_LIST --out DIR``); the library behind it is
:mod:`svd_fast.diffusers.generation` and :mod:`svd_fast.diffusers.generation_batch`. Every argument, path and
the image are checked before the model loads; a problem is a :class:`~svd_fast.commands.errors.UsageError`
(one line, exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from svd_fast import _io
from svd_fast.commands.errors import EXIT_PARTIAL, UsageError, require_output_folder, require_writable_dir

EXAMPLES = """examples:
  svd-fast generate --model models/svd-xt --variant fp16 --image rocket.png --out rocket.mp4 \\
      --frames 25 --steps 25 --dtype fp16 --guidance-preset svd-xt
  svd-fast generate --model stabilityai/stable-video-diffusion-img2vid --image cat.jpg --out cat.gif
  svd-fast make-tiny tiny && svd-fast generate --model tiny --image cat.jpg --out frames/   # PNG frames
  svd-fast generate --model tiny --input photos/ --out videos/ --ray local --actors 2    # one video per image
  svd-fast generate --model tiny --image cat.jpg --out cat.mp4 --sampler ipndm-2 --steps 15 --cache-interval 3
  svd-fast generate --model ./stable-video-diffusion-img2vid-xt --unet-weights AnimateLCM-SVD-xt-1.1.safetensors \\
      --sampler consistency --image rocket.png --out rocket.mp4 --frames 25      # 4 steps, guidance 1
  svd-fast generate --model runs/distill/pipeline --image cat.jpg --out cat.mp4   # svd_fast.json: consistency, its steps
  svd-fast generate --model ./svd-xt --image cat.jpg --out long.mp4 --frames 72 --overlap 4 --lora run/lora:0.8
guidance presets (min -> max over frames, steps): diffusers 1.0->3.0, 25; svd 1.0->2.5, 25; svd-xt 1.5->3.0, 30"""

DTYPE_NAMES = ("fp32", "fp16", "bf16")
# svd_fast.diffusers.settings.SAMPLER_CHOICES, spelled out so that parsing arguments does not import torch (a test
# keeps them equal).
SAMPLER_NAMES = ("auto", "consistency", "euler", "dpmpp-2m", "ipndm-2")
# svd_fast.backends.BACKENDS, likewise (tests/test_machine_output.py keeps them equal).
BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate a video from an image (or one per image of a folder) with an SVD pipeline",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="diffusers-format SVD folder, or a hub id where the network allows")
    parser.add_argument("--variant", help='weights variant to load, e.g. "fp16" for a folder of *.fp16.safetensors (the usual download)')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="conditioning image (first frame)")
    source.add_argument("--input", type=Path, help="batch: a folder of images, or a text file listing one image path a line")
    parser.add_argument("--out", required=True, type=Path, help="OUT.mp4, OUT.gif or a folder for PNG frames; with --input the output folder")
    parser.add_argument("--format", choices=("mp4", "gif", "frames"), default="mp4", help="batch output format (default: mp4)")
    parser.add_argument("--frames", type=int, help="number of frames, >= 2 (default: the UNet's num_frames)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the guidance preset's)")
    parser.add_argument("--height", type=int, help="output height in pixels (default: 576, or a smaller model's sample size)")
    parser.add_argument("--width", type=int, help="output width in pixels (default: 1024, or a smaller model's sample size)")
    parser.add_argument("--fps", type=int, default=7, help="fps conditioning and output frame rate, > 0 (default: 7)")
    parser.add_argument("--motion-bucket-id", type=int, default=127, help="motion conditioning, 0-255 (default: 127)")
    parser.add_argument("--noise-aug-strength", type=float, default=0.02, help="conditioning noise, >= 0 (default: 0.02)")
    parser.add_argument("--guidance-preset", choices=("diffusers", "svd", "svd-xt"), default="diffusers")
    parser.add_argument("--min-guidance", type=float, help="guidance at the first frame (overrides the preset)")
    parser.add_argument("--max-guidance", type=float, help="guidance at the last frame (overrides the preset)")
    parser.add_argument("--decode-chunk-size", type=int, help="frames decoded by the VAE at once (default: 8, 2 with --low-memory; "
                        "lower: less memory, about 1.1 GiB per 576x1024 frame in fp16)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (batch: each image's seed derives from it and its name)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--backend", choices=("auto",) + BACKEND_NAMES, default="auto", help="kernel backend for every op")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--low-memory", action="store_true", help="feed-forward chunking, small VAE chunks, CPU offload")
    parser.add_argument("--no-optimize", action="store_true", help="run the stock diffusers pipeline (for comparison)")
    parser.add_argument("--attention", choices=("auto", "sdpa", "flash-attn"), default="auto",
                        help="spatial self-attention: flash-attn when installed (auto), or PyTorch SDPA")
    parser.add_argument("--cuda-graphs", action="store_true", help="capture the UNet step as a CUDA graph (CUDA only)")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default="auto",
                        help="euler (SVD's), ipndm-2 (second order: at 15 steps as accurate as Euler at 25), dpmpp-2m, or "
                             "consistency (few-step models: AnimateLCM-SVD-xt, svd-fast distill; default 4 steps, guidance 1); "
                             "auto (default): what the model folder's svd_fast.json says, else euler")
    parser.add_argument("--unet-weights", help="a UNet state dict (.safetensors) loaded over the model's UNet, strictly "
                                               "(e.g. AnimateLCM-SVD-xt-1.1.safetensors)")
    parser.add_argument("--cache-interval", type=int, default=1,
                        help="N > 1: full UNet every N-th step, outer level only in between (faster, slight deviation)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="LoRA adapter (svd-fast train's output, diffusers or peft layout) fused at SCALE (default 1); repeatable")
    parser.add_argument("--window", type=int, help="long videos: frames per window when --frames exceeds it (default: the UNet's num_frames)")
    parser.add_argument("--overlap", type=int, default=2, help="long videos: frames two windows share, 0 <= K < window (default: 2)")
    parser.add_argument("--parallel", choices=("guidance", "frames", "guidance+frames"),
                        help="one video on several processes: guidance (2 ranks, the CFG halves), frames (N ranks, frames split), "
                             "guidance+frames (2 x N); under torchrun/deepspeed the launcher's ranks, else --nproc started here")
    parser.add_argument("--nproc", type=int, help="with --parallel: processes to start (default 2, 4 for guidance+frames; one GPU each on CUDA)")
    parser.add_argument("--ray", choices=("auto", "local"), help="batch: spread over Ray actors (auto: the running cluster; local: start one)")
    parser.add_argument("--actors", type=int, help="batch with --ray: pipeline actors (default: one per GPU, else 2)")
    parser.set_defaults(func=run)


def flag(name: str) -> str:
    """The command-line spelling of a generation setting (:class:`~svd_fast.diffusers.settings.OptionError`'s names)."""
    return "--" + name.replace("_", "-")


def options_from_args(args: argparse.Namespace):
    from svd_fast.diffusers.generation import GenerateOptions  # noqa: PLC0415 - torch and diffusers load only when the command runs

    fields = {field.name for field in dataclasses.fields(GenerateOptions)} - {"optimize", "progress"}
    return GenerateOptions(**{name: getattr(args, name) for name in fields}, optimize=not args.no_optimize)


def run(args: argparse.Namespace) -> int:
    from svd_fast import media  # noqa: PLC0415 - PIL and numpy load only when the command runs
    from svd_fast.diffusers.loading import ModelFolderError  # noqa: PLC0415 - torch and diffusers load only when the command runs
    from svd_fast.diffusers.settings import OptionError  # noqa: PLC0415 - torch and diffusers load only when the command runs

    if args.input is None and (args.ray is not None or args.actors is not None):
        raise UsageError("--ray and --actors apply to batch generation", "pass --input DIR_OR_LIST instead of --image")
    try:
        return _run(args)
    except OptionError as error:
        raise UsageError(error.render(flag, with_todo=False), error.render_todo(flag)) from None
    except (ModelFolderError, media.MediaError) as error:  # they name the flag themselves
        raise UsageError(str(error)) from None
    except _io.OutputBusyError as error:
        raise UsageError(str(error), "wait for it to finish, or choose another --out") from None
    except ConnectionError as error:  # ray.init(address="auto") without a cluster
        raise UsageError(f"--ray {args.ray}: no running Ray cluster to join ({str(error).splitlines()[0]})",
                         "start one with `ray start --head`, or use --ray local") from None


def _run(args: argparse.Namespace) -> int:
    from svd_fast import media  # noqa: PLC0415 - PIL and numpy load only when the command runs
    from svd_fast.diffusers import generation  # noqa: PLC0415 - torch and diffusers load only when the command runs
    from svd_fast.diffusers.generation_batch import generate_batch, list_images  # noqa: PLC0415 - torch and diffusers load only when the command runs

    options = options_from_args(args)
    if args.parallel is not None or args.nproc is not None:
        return _run_parallel(args, options)
    if args.input is not None:
        generation.check_options(options)  # the arguments' errors before the folder check's
        list_images(args.input)  # before the output folder is created
        require_output_folder("--out", args.out, "videos", [args.input])

        def report(row: dict) -> None:
            print(f"{row['status']}: {row['output']}" + (f" ({row['error']})" if row["error"] else ""), file=sys.stderr)

        summary = generate_batch(args.input, args.out, options, output_format=args.format, ray=args.ray, actors=args.actors, on_row=report)
        failed = len(summary["failed"])
        print(f"{summary['videos'] - failed} of {summary['videos']} videos in {summary['out']} ({summary['already_there']} already there); {failed} failed")
        return EXIT_PARTIAL if failed else 0
    media.check_output(args.out, [args.image])
    options = generation.check_options(options)
    if options.sampler == "consistency" and options.max_guidance > 1:
        print("svd-fast generate: note: --sampler consistency with a guidance above 1 runs classifier-free guidance, "
              "which doubles the UNet batch (2 evaluations per step)", file=sys.stderr)
    require_writable_dir("--out folder", args.out.parent)
    summary = generation.generate_video(args.image, args.out, options)
    seconds = summary["seconds"]
    print(
        f"wrote {summary['out']}: {summary['frames']} frames {summary['size'][0]}x{summary['size'][1]}, "
        f"{summary['steps']} steps on {summary['device']} ({summary['dtype']}); load {seconds['load']} s, "
        f"sample+decode {seconds['sample_and_decode']} s; peak memory {summary['peak_memory_gib']} GiB "
        f"({summary['peak_memory_kind']})"
    )
    print(json.dumps({"backends_used": summary["backends_used"], "optimized": summary["optimized"]}))
    return 0


def _run_parallel(args: argparse.Namespace, options) -> int:
    from svd_fast.diffusers.parallel_launch import generate_parallel  # noqa: PLC0415 - torch.distributed loads only when the command runs

    if args.parallel is None:
        raise UsageError("--nproc applies to --parallel", "add --parallel guidance|frames|guidance+frames")
    if args.input is not None:
        raise UsageError("--parallel generates one video (--image)", "spread a batch over processes with --ray instead")
    require_writable_dir("--out folder", args.out.parent)
    generate_parallel(args.image, args.out, options, args.parallel, args.nproc, on_written=print_parallel_summary)
    return 0


def print_parallel_summary(summary: dict) -> None:
    """Rank 0's report of a parallel generation (stdout: one line for people, one JSON line)."""
    print(f"wrote {summary['out']}: {summary['frames']} frames {summary['size'][0]}x{summary['size'][1]}, {summary['steps']} steps "
          f"on {summary['ranks']} ranks ({summary['parallel']}, {summary['device']}, {summary['dtype']})", flush=True)
    print(json.dumps({"parallel": {"mode": summary["parallel"], "ranks": summary["ranks"]}}), flush=True)
