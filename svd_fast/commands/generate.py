"""`svd-fast generate`: image-to-video with an SVD / SVD-XT diffusers pipeline, optimized by svd_fast.

One image (``--image IMG --out OUT``) or a batch (``--input DIR_OR_LIST --out DIR``, see
:mod:`svd_fast.commands.generate_batch`). Every argument, path and the image are checked before the model
loads; a problem is a :class:`~svd_fast.commands.errors.UsageError` (one line, exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import time
from pathlib import Path
from typing import Any

from svd_fast.backends import BACKENDS
from svd_fast.commands.errors import UsageError, require_in_range, require_positive, require_writable_dir

EXAMPLES = """examples:
  svd-fast generate --model ./stable-video-diffusion-img2vid-xt --image rocket.png --out rocket.mp4 \\
      --frames 25 --steps 25 --dtype fp16 --guidance-preset svd-xt
  svd-fast generate --model stabilityai/stable-video-diffusion-img2vid --image cat.jpg --out cat.gif
  svd-fast make-tiny tiny && svd-fast generate --model tiny --image cat.jpg --out frames/   # PNG frames
  svd-fast generate --model tiny --input photos/ --out videos/ --ray local --actors 2    # one video per image
  svd-fast generate --model tiny --image cat.jpg --out cat.mp4 --sampler ipndm-2 --steps 15 --cache-interval 3
guidance presets (min -> max over frames, steps): diffusers 1.0->3.0, 25; svd 1.0->2.5, 25; svd-xt 1.5->3.0, 30"""

DTYPE_NAMES = ("fp32", "fp16", "bf16")
# svd_fast.sampling.SAMPLERS, spelled out so that parsing arguments does not import torch (a test keeps them equal).
SAMPLER_NAMES = ("euler", "dpmpp-2m", "ipndm-2")


@dataclasses.dataclass
class GenerateOptions:
    """Everything but the image and the output path: shared by every video of a batch."""

    model: str
    frames: int | None = None
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    guidance_preset: str = "diffusers"
    min_guidance: float | None = None
    max_guidance: float | None = None
    decode_chunk_size: int | None = None
    seed: int = 0
    dtype: str | None = None
    backend: str = "auto"
    device: str | None = None
    low_memory: bool = False
    optimize: bool = True
    attention: str = "auto"
    cuda_graphs: bool = False
    sampler: str = "euler"
    cache_interval: int = 1
    progress: bool = True


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate a video from an image (or one per image of a folder) with an SVD pipeline",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="diffusers-format SVD folder, or a hub id where the network allows")
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
    parser.add_argument("--decode-chunk-size", type=int, help="frames decoded by the VAE at once (lower: less memory)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (batch: each image's seed derives from it and its name)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto", help="kernel backend for every op")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--low-memory", action="store_true", help="feed-forward chunking, small VAE chunks, CPU offload")
    parser.add_argument("--no-optimize", action="store_true", help="run the stock diffusers pipeline (for comparison)")
    parser.add_argument("--attention", choices=("auto", "sdpa", "flash-attn"), default="auto",
                        help="spatial self-attention: flash-attn when installed (auto), or PyTorch SDPA")
    parser.add_argument("--cuda-graphs", action="store_true", help="capture the UNet step as a CUDA graph (CUDA only)")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default="euler",
                        help="euler (SVD's), ipndm-2 (second order: at 15 steps as accurate as Euler at 25) or dpmpp-2m")
    parser.add_argument("--cache-interval", type=int, default=1,
                        help="N > 1: full UNet every N-th step, outer level only in between (faster, slight deviation)")
    parser.add_argument("--ray", choices=("auto", "local"), help="batch: spread over Ray actors (auto: the running cluster; local: start one)")
    parser.add_argument("--actors", type=int, help="batch with --ray: pipeline actors (default: one per GPU, else 2)")
    parser.set_defaults(func=run)


def _model_config(model: str) -> dict[str, Any] | None:
    """The UNet and VAE configs of a local model folder (read before loading), None for a hub id."""
    path = Path(model).expanduser()
    if not path.exists():
        return None
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
        vae = json.loads((path / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return None  # load_pipeline's folder check names what is missing
    return {"unet": unet, "vae": vae}


def check_options(options: GenerateOptions) -> GenerateOptions:
    """Raise UsageError for any bad option, and fill in every default that needs no model load."""
    from svd_fast.diffusers.loading import ModelFolderError, check_model_folder  # noqa: PLC0415
    from svd_fast.sampling import GUIDANCE_PRESETS  # noqa: PLC0415

    model_path = Path(options.model).expanduser()
    if model_path.exists() or str(options.model).startswith((".", "/", "~")):
        try:
            check_model_folder(model_path)
        except ModelFolderError as error:
            raise UsageError(str(error), "pass a diffusers-format SVD folder (see `svd-fast make-tiny`)") from None
    if options.frames is not None and (options.frames < 2):
        raise UsageError(f"--frames must be >= 2, got {options.frames}")
    require_positive("--steps", options.steps, integer=True)
    require_positive("--fps", options.fps, integer=True)
    require_positive("--decode-chunk-size", options.decode_chunk_size, integer=True)
    require_positive("--cache-interval", options.cache_interval, integer=True)
    require_in_range("--motion-bucket-id", options.motion_bucket_id, 0, 255)
    require_in_range("--noise-aug-strength", options.noise_aug_strength, 0.0, math.inf)
    preset = GUIDANCE_PRESETS[options.guidance_preset]
    minimum = preset.min_guidance if options.min_guidance is None else options.min_guidance
    maximum = preset.max_guidance if options.max_guidance is None else options.max_guidance
    require_in_range("--min-guidance", minimum, 0.0, math.inf)
    require_in_range("--max-guidance", maximum, 0.0, math.inf)
    if minimum > maximum:
        raise UsageError(f"--min-guidance ({minimum}) must not exceed --max-guidance ({maximum})", "the guidance rises over the frames")
    if options.sampler not in SAMPLER_NAMES:
        raise UsageError(f"--sampler must be one of {SAMPLER_NAMES}, got {options.sampler!r}")
    if (options.sampler != "euler" or options.cache_interval > 1) and not options.optimize:
        raise UsageError("--sampler and --cache-interval need the optimized pipeline", "drop --no-optimize")

    config = _model_config(options.model)
    if config is not None:
        vae_scale = 2 ** (len(config["vae"]["block_out_channels"]) - 1)
        # The VAE and each UNet level halve the size; diffusers' pipeline also asks for multiples of 8.
        multiple = math.lcm(8, vae_scale * 2 ** (len(config["unet"]["block_out_channels"]) - 1))
        native = config["unet"]["sample_size"] * vae_scale
        default_size = (576, 1024) if native >= 576 else (native, native)
        default_frames = config["unet"]["num_frames"]
    else:
        multiple, default_size, default_frames = 64, (576, 1024), 14
    for name, value in (("--height", options.height), ("--width", options.width)):
        if value is not None and (value < multiple or value % multiple):
            raise UsageError(f"{name} must be a positive multiple of {multiple} for this model, got {value}")
    height = default_size[0] if options.height is None else options.height
    width = default_size[1] if options.width is None else options.width
    frames = default_frames if options.frames is None else options.frames
    steps = preset.num_inference_steps if options.steps is None else options.steps

    import torch  # noqa: PLC0415

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = options.dtype or ("fp16" if device == "cuda" else "fp32")
    if device == "cpu" and dtype == "fp16":
        raise UsageError("--dtype fp16 is not supported on the CPU", "use fp32 or bf16")
    if options.cuda_graphs and (device != "cuda" or options.low_memory or not options.optimize):
        raise UsageError("--cuda-graphs needs --device cuda, and cannot be combined with --low-memory or --no-optimize")
    if options.cuda_graphs and options.cache_interval > 1:
        raise UsageError("--cuda-graphs cannot be combined with --cache-interval > 1")
    if options.attention == "flash-attn":
        from svd_fast.diffusers.attention_processors import flash_attn_unavailable_reason  # noqa: PLC0415

        reason = flash_attn_unavailable_reason()
        if reason is not None:
            raise UsageError(f"--attention flash-attn: {reason}", "use --attention auto or sdpa")
    return dataclasses.replace(
        options, height=height, width=width, frames=frames, steps=steps, min_guidance=minimum, max_guidance=maximum,
        device=device, dtype=dtype,
    )  # fmt: skip


def load_optimized_pipeline(options: GenerateOptions):
    """The pipeline of checked ``options``, on its device, optimized as asked."""
    import svd_fast  # noqa: PLC0415
    from svd_fast.diffusers.loading import ModelFolderError, load_pipeline  # noqa: PLC0415
    from svd_fast.diffusers.patching import DTYPES  # noqa: PLC0415

    try:
        pipe = load_pipeline(options.model, dtype=DTYPES[options.dtype])
    except ModelFolderError as error:
        raise UsageError(str(error)) from None
    if not options.low_memory:
        pipe = pipe.to(options.device)
    if options.optimize:
        svd_fast.optimize(
            pipe, backend=options.backend, low_memory=options.low_memory, attention=options.attention,
            cuda_graphs=options.cuda_graphs, sampler=options.sampler, cache_interval=options.cache_interval,
        )  # fmt: skip
    pipe.set_progress_bar_config(disable=not options.progress)
    return pipe


def sample_video(pipe, condition, options: GenerateOptions, seed: int):
    """The frames (PIL images) of one video."""
    import torch  # noqa: PLC0415

    import svd_fast  # noqa: PLC0415

    generator = torch.Generator(device="cpu").manual_seed(seed)
    with svd_fast.use_backend(options.backend):
        result = pipe(
            condition, height=options.height, width=options.width, num_frames=options.frames,
            num_inference_steps=options.steps, min_guidance_scale=options.min_guidance,
            max_guidance_scale=options.max_guidance, fps=options.fps, motion_bucket_id=options.motion_bucket_id,
            noise_aug_strength=options.noise_aug_strength,
            decode_chunk_size=options.decode_chunk_size or (2 if options.low_memory else options.frames),
            generator=generator,
        )  # fmt: skip
    return result.frames[0]


def generate(model: str | Path, image: str | Path, out: str | Path, **options: Any) -> dict[str, Any]:
    """Generate a video from ``image`` with the pipeline at ``model`` and write it to ``out`` (atomically);
    ``options`` are :class:`GenerateOptions` fields. Returns a summary."""
    return generate_with(image, out, GenerateOptions(model=str(model), **options))


def generate_with(image: str | Path, out: str | Path, options: GenerateOptions) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    import svd_fast  # noqa: PLC0415
    from svd_fast import media  # noqa: PLC0415

    try:
        media.output_kind(out)
    except media.MediaError as error:
        raise UsageError(str(error)) from None
    options = check_options(options)
    out = Path(out)
    require_writable_dir("--out folder", out.parent)
    try:
        condition = media.load_image(image, max_size=(options.width, options.height))
    except media.MediaError as error:
        raise UsageError(str(error)) from None

    started = time.perf_counter()
    pipe = load_optimized_pipeline(options)
    if options.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loaded = time.perf_counter()
    frames = sample_video(pipe, condition, options, options.seed)
    sampled = time.perf_counter()
    written = media.write_frames(frames, out, fps=options.fps)
    peak = torch.cuda.max_memory_allocated() if options.device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "out": str(written),
        "frames": options.frames,
        "size": [options.height, options.width],
        "steps": options.steps,
        "guidance": [options.min_guidance, options.max_guidance],
        "sampler": options.sampler,
        "cache_interval": options.cache_interval,
        "device": options.device,
        "dtype": options.dtype,
        "optimized": svd_fast.describe(pipe) if options.optimize else {},
        "backends_used": svd_fast.backends_used(),
        "seconds": {"load": round(loaded - started, 2), "sample_and_decode": round(sampled - loaded, 2), "write": round(time.perf_counter() - sampled, 2)},
        "peak_memory_gib": round(peak / 2**30, 3),
        "peak_memory_kind": "CUDA allocated" if options.device == "cuda" else "process max RSS",
    }


def options_from_args(args: argparse.Namespace) -> GenerateOptions:
    fields = {field.name for field in dataclasses.fields(GenerateOptions)} - {"optimize", "progress"}
    return GenerateOptions(**{name: getattr(args, name) for name in fields}, optimize=not args.no_optimize)


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    if args.input is not None:
        from svd_fast.commands.generate_batch import run_batch  # noqa: PLC0415

        return run_batch(args.input, args.out, options, output_format=args.format, ray=args.ray, actors=args.actors)
    if args.ray is not None or args.actors is not None:
        raise UsageError("--ray and --actors apply to batch generation", "pass --input DIR_OR_LIST instead of --image")
    summary = generate_with(args.image, args.out, options)
    seconds = summary["seconds"]
    print(
        f"wrote {summary['out']}: {summary['frames']} frames {summary['size'][0]}x{summary['size'][1]}, "
        f"{summary['steps']} steps on {summary['device']} ({summary['dtype']}); load {seconds['load']} s, "
        f"sample+decode {seconds['sample_and_decode']} s; peak memory {summary['peak_memory_gib']} GiB "
        f"({summary['peak_memory_kind']})"
    )
    print(json.dumps({"backends_used": summary["backends_used"], "optimized": summary["optimized"]}))
    return 0
