"""`svd-fast generate`: image-to-video with an SVD / SVD-XT diffusers pipeline, optimized by svd_fast."""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

from svd_fast.backends import BACKENDS

EXAMPLES = """examples:
  svd-fast generate --model ./stable-video-diffusion-img2vid-xt --image rocket.png --out rocket.mp4 \\
      --frames 25 --steps 25 --dtype fp16 --guidance-preset svd-xt
  svd-fast generate --model stabilityai/stable-video-diffusion-img2vid --image cat.jpg --out cat.gif
  svd-fast make-tiny tiny && svd-fast generate --model tiny --image cat.jpg --out frames/   # PNG frames
guidance presets (min -> max over frames, steps): diffusers 1.0->3.0, 25; svd 1.0->2.5, 25; svd-xt 1.5->3.0, 30"""

DTYPE_NAMES = ("fp32", "fp16", "bf16")


class GenerateError(ValueError):
    """A user-facing problem with generate's arguments or inputs."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate a video from an image with an SVD pipeline",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="diffusers-format SVD folder, or a hub id where the network allows")
    parser.add_argument("--image", required=True, type=Path, help="conditioning image (first frame)")
    parser.add_argument("--out", required=True, type=Path, help="OUT.mp4, OUT.gif, or a folder for PNG frames")
    parser.add_argument("--frames", type=int, help="number of frames (default: the UNet's num_frames)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the guidance preset's)")
    parser.add_argument("--height", type=int, help="output height in pixels (default: 576, or a smaller model's sample size)")
    parser.add_argument("--width", type=int, help="output width in pixels (default: 1024, or a smaller model's sample size)")
    parser.add_argument("--fps", type=int, default=7, help="fps conditioning and output frame rate (default: 7)")
    parser.add_argument("--motion-bucket-id", type=int, default=127, help="motion conditioning, 0-255 (default: 127)")
    parser.add_argument("--noise-aug-strength", type=float, default=0.02, help="conditioning noise (default: 0.02)")
    parser.add_argument("--guidance-preset", choices=("diffusers", "svd", "svd-xt"), default="diffusers")
    parser.add_argument("--min-guidance", type=float, help="guidance at the first frame (overrides the preset)")
    parser.add_argument("--max-guidance", type=float, help="guidance at the last frame (overrides the preset)")
    parser.add_argument("--decode-chunk-size", type=int, help="frames decoded by the VAE at once (lower: less memory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto", help="kernel backend for every op")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--low-memory", action="store_true", help="feed-forward chunking, small VAE chunks, CPU offload")
    parser.add_argument("--no-optimize", action="store_true", help="run the stock diffusers pipeline (for comparison)")
    parser.add_argument("--attention", choices=("auto", "sdpa", "flash-attn"), default="auto",
                        help="spatial self-attention: flash-attn when installed (auto), or PyTorch SDPA")
    parser.add_argument("--cuda-graphs", action="store_true", help="capture the UNet step as a CUDA graph (CUDA only)")
    parser.set_defaults(func=run)


def generate(
    model: str | Path,
    image: str | Path,
    out: str | Path,
    frames: int | None = None,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    fps: int = 7,
    motion_bucket_id: int = 127,
    noise_aug_strength: float = 0.02,
    guidance_preset: str = "diffusers",
    min_guidance: float | None = None,
    max_guidance: float | None = None,
    decode_chunk_size: int | None = None,
    seed: int = 0,
    dtype: str | None = None,
    backend: str = "auto",
    device: str | None = None,
    low_memory: bool = False,
    optimize: bool = True,
    progress: bool = True,
    attention: str = "auto",
    cuda_graphs: bool = False,
) -> dict[str, Any]:
    """Generate a video from ``image`` with the pipeline at ``model`` and write it to ``out``; returns a summary."""
    import torch  # noqa: PLC0415

    import svd_fast  # noqa: PLC0415
    from svd_fast import media  # noqa: PLC0415
    from svd_fast.diffusers.loading import load_pipeline  # noqa: PLC0415
    from svd_fast.diffusers.patching import DTYPES  # noqa: PLC0415
    from svd_fast.sampling import GUIDANCE_PRESETS  # noqa: PLC0415

    media.output_kind(out)  # an unsupported --out fails before any loading
    if frames is not None and frames < 1:
        raise GenerateError(f"--frames must be >= 1, got {frames}")
    if steps is not None and steps < 1:
        raise GenerateError(f"--steps must be >= 1, got {steps}")
    if not 0 <= motion_bucket_id <= 255:
        raise GenerateError(f"--motion-bucket-id must be in [0, 255], got {motion_bucket_id}")
    if decode_chunk_size is not None and decode_chunk_size < 1:
        raise GenerateError(f"--decode-chunk-size must be >= 1, got {decode_chunk_size}")
    preset = GUIDANCE_PRESETS[guidance_preset]
    min_guidance = preset.min_guidance if min_guidance is None else min_guidance
    max_guidance = preset.max_guidance if max_guidance is None else max_guidance
    steps = preset.num_inference_steps if steps is None else steps
    condition = media.load_image(image)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("fp16" if device == "cuda" else "fp32")
    if device == "cpu" and dtype == "fp16":
        raise GenerateError("--dtype fp16 is not supported on the CPU; use fp32 or bf16")
    if cuda_graphs and (device != "cuda" or low_memory or not optimize):
        raise GenerateError("--cuda-graphs needs --device cuda, and cannot be combined with --low-memory or --no-optimize")
    started = time.perf_counter()
    pipe = load_pipeline(model, dtype=DTYPES[dtype])
    if not low_memory:
        pipe = pipe.to(device)
    # The VAE and each UNet level halve the size; diffusers' pipeline also asks for multiples of 8.
    multiple = math.lcm(8, pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1))
    # SVD's native 576x1024, or a smaller model's own sample size (the tiny test model: 64x64).
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    default_size = (576, 1024) if native >= 576 else (native, native)
    height, width = height or default_size[0], width or default_size[1]
    for name, value in (("--height", height), ("--width", width)):
        if value < multiple or value % multiple:
            raise GenerateError(f"{name} must be a positive multiple of {multiple} for this model, got {value}")
    frames = frames or pipe.unet.config.num_frames
    if optimize:
        try:
            svd_fast.optimize(pipe, backend=backend, low_memory=low_memory, attention=attention, cuda_graphs=cuda_graphs)
        except ValueError as error:  # e.g. --attention flash-attn without flash-attn installed
            raise GenerateError(str(error)) from error
    pipe.set_progress_bar_config(disable=not progress)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loaded = time.perf_counter()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with svd_fast.use_backend(backend):
        result = pipe(
            condition,
            height=height,
            width=width,
            num_frames=frames,
            num_inference_steps=steps,
            min_guidance_scale=min_guidance,
            max_guidance_scale=max_guidance,
            fps=fps,
            motion_bucket_id=motion_bucket_id,
            noise_aug_strength=noise_aug_strength,
            decode_chunk_size=decode_chunk_size or (2 if low_memory else frames),
            generator=generator,
        )
    sampled = time.perf_counter()
    written = media.write_frames(result.frames[0], out, fps=fps)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "out": str(written),
        "frames": frames,
        "size": [height, width],
        "steps": steps,
        "guidance": [min_guidance, max_guidance],
        "device": device,
        "dtype": dtype,
        "optimized": svd_fast.describe(pipe) if optimize else {},
        "backends_used": svd_fast.backends_used(),
        "seconds": {"load": round(loaded - started, 2), "sample_and_decode": round(sampled - loaded, 2), "write": round(time.perf_counter() - sampled, 2)},
        "peak_memory_gib": round(peak / 2**30, 3),
        "peak_memory_kind": "CUDA allocated" if device == "cuda" else "process max RSS",
    }


def run(args: argparse.Namespace) -> int:
    from svd_fast.diffusers.loading import ModelFolderError  # noqa: PLC0415
    from svd_fast.media import MediaError  # noqa: PLC0415

    try:
        summary = generate(
            args.model, args.image, args.out, frames=args.frames, steps=args.steps, height=args.height,
            width=args.width, fps=args.fps, motion_bucket_id=args.motion_bucket_id,
            noise_aug_strength=args.noise_aug_strength, guidance_preset=args.guidance_preset,
            min_guidance=args.min_guidance, max_guidance=args.max_guidance,
            decode_chunk_size=args.decode_chunk_size, seed=args.seed, dtype=args.dtype, backend=args.backend,
            device=args.device, low_memory=args.low_memory, optimize=not args.no_optimize,
            attention=args.attention, cuda_graphs=args.cuda_graphs,
        )
    except (GenerateError, MediaError, ModelFolderError) as error:
        print(f"svd-fast generate: error: {error}", file=sys.stderr)
        return 2
    seconds = summary["seconds"]
    print(
        f"wrote {summary['out']}: {summary['frames']} frames {summary['size'][0]}x{summary['size'][1]}, "
        f"{summary['steps']} steps on {summary['device']} ({summary['dtype']}); load {seconds['load']} s, "
        f"sample+decode {seconds['sample_and_decode']} s; peak memory {summary['peak_memory_gib']} GiB "
        f"({summary['peak_memory_kind']})"
    )
    print(json.dumps({"backends_used": summary["backends_used"], "optimized": summary["optimized"]}))
    return 0
