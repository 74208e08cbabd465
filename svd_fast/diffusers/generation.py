"""Image-to-video generation with an SVD / SVD-XT pipeline, optimized by svd_fast: the library behind
``svd-fast generate`` (one image; a batch is :mod:`svd_fast.diffusers.generation_batch`).

* :class:`GenerateOptions` and :func:`check_options`: every setting but the image and the output path, checked
  and completed before the model loads (an :class:`~svd_fast.diffusers.settings.OptionError` naming the field);
* :func:`load_optimized_pipeline`: the one way svd_fast loads a pipeline (generation, the demo, training's
  validation samples), optionally around components the caller already holds;
* :func:`sample_video` and :func:`generate`: one video.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import StableVideoDiffusionPipeline

from svd_fast import media
from svd_fast.backends import backends_used, use_backend
from svd_fast.diffusers.loading import ModelFolderError, check_model_folder
from svd_fast.diffusers.patching import describe, optimize
from svd_fast.diffusers.settings import OptionError, check_settings, require_in_range, require_positive
from svd_fast.sampling.guidance import GUIDANCE_PRESETS


@dataclasses.dataclass
class GenerateOptions:
    """Everything but the image and the output path: shared by every video of a batch."""

    model: str
    variant: str | None = None  # e.g. "fp16": the *.fp16.safetensors weights of an fp16-only download
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


def _model_config(model: str) -> dict[str, Any] | None:
    """The UNet and VAE configs of a local model folder (read before loading), None for a hub id."""
    path = Path(model).expanduser()
    if not path.exists():
        return None
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
        vae = json.loads((path / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return None  # the folder check of load_optimized_pipeline names what is missing
    return {"unet": unet, "vae": vae}


def _looks_like_path(model: str | Path) -> bool:
    return Path(model).expanduser().exists() or str(model).startswith((".", "/", "~"))


def check_options(options: GenerateOptions) -> GenerateOptions:
    """Raise OptionError (a ValueError naming the field) or ModelFolderError for any bad option, and fill in
    every default that needs no model load."""
    if _looks_like_path(options.model):
        check_model_folder(Path(options.model).expanduser())
    if options.frames is not None and options.frames < 2:
        raise OptionError("{frames} must be >= 2, got {got}", got=options.frames)
    for name in ("steps", "fps", "decode_chunk_size", "cache_interval"):
        require_positive(name, getattr(options, name), integer=True)
    require_in_range("motion_bucket_id", options.motion_bucket_id, 0, 255)
    require_in_range("noise_aug_strength", options.noise_aug_strength, 0.0, math.inf)
    if options.guidance_preset not in GUIDANCE_PRESETS:
        raise OptionError("{guidance_preset} must be one of {choices}, got {got!r}", choices=tuple(GUIDANCE_PRESETS), got=options.guidance_preset)
    preset = GUIDANCE_PRESETS[options.guidance_preset]
    minimum = preset.min_guidance if options.min_guidance is None else options.min_guidance
    maximum = preset.max_guidance if options.max_guidance is None else options.max_guidance
    require_in_range("min_guidance", minimum, 0.0, math.inf)
    require_in_range("max_guidance", maximum, 0.0, math.inf)
    if minimum > maximum:
        raise OptionError("{min_guidance} ({low}) must not exceed {max_guidance} ({high})", "the guidance rises over the frames", low=minimum, high=maximum)

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
    for name in ("height", "width"):
        value = getattr(options, name)
        if value is not None and (value < multiple or value % multiple):
            raise OptionError("{" + name + "} must be a positive multiple of {multiple} for this model, got {got}", multiple=multiple, got=value)
    height = default_size[0] if options.height is None else options.height
    width = default_size[1] if options.width is None else options.width
    frames = default_frames if options.frames is None else options.frames
    steps = preset.num_inference_steps if options.steps is None else options.steps

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = options.dtype or ("fp16" if device == "cuda" else "fp32")
    check_settings(
        backend=options.backend, dtype=dtype, device=device, low_memory=options.low_memory, attention=options.attention,
        cuda_graphs=options.cuda_graphs, sampler=options.sampler, cache_interval=options.cache_interval,
        optimized=options.optimize,
    )  # fmt: skip
    return dataclasses.replace(
        options, height=height, width=width, frames=frames, steps=steps, min_guidance=minimum, max_guidance=maximum,
        device=device, dtype=dtype,
    )  # fmt: skip


def load_optimized_pipeline(
    model: str | Path,
    *,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device | None = None,
    optimized: bool = True,
    progress: bool = True,
    variant: str | None = None,
    components: dict[str, Any] | None = None,
    **settings: Any,
) -> StableVideoDiffusionPipeline:
    """The StableVideoDiffusionPipeline at ``model`` (a local diffusers folder, or a hub id where the network
    allows), moved to ``device`` (None: left where it loads; not moved with ``low_memory``, whose offload
    places each model) and, when ``optimized``, patched by :func:`svd_fast.optimize` with ``settings``
    (its keyword arguments). ``components`` (e.g. ``vae=``, ``scheduler=``) are taken as given instead of
    being loaded. ModelFolderError names what is wrong with ``model``."""
    if _looks_like_path(model) or Path(model).suffix:
        check_model_folder(Path(model).expanduser())
        source = str(Path(model).expanduser())
    else:
        source = str(model)  # hub id such as stabilityai/stable-video-diffusion-img2vid-xt
    kwargs: dict[str, Any] = dict(components or {})
    kwargs["dtype"] = check_settings(dtype=dtype)
    if variant is not None:
        kwargs["variant"] = variant
    try:
        pipe = StableVideoDiffusionPipeline.from_pretrained(source, **kwargs)
    except OSError as error:
        raise ModelFolderError(f"--model: could not load {model!r}: {error}") from error
    if device is not None and not settings.get("low_memory", False):
        pipe = pipe.to(device)
    if optimized:
        optimize(pipe, **settings)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def pipeline_for(options: GenerateOptions) -> StableVideoDiffusionPipeline:
    """The pipeline of checked ``options``, on its device, optimized as asked."""
    return load_optimized_pipeline(
        options.model, dtype=options.dtype, device=options.device, optimized=options.optimize, progress=options.progress, variant=options.variant,
        **(dict(backend=options.backend, low_memory=options.low_memory, attention=options.attention, cuda_graphs=options.cuda_graphs,
                sampler=options.sampler, cache_interval=options.cache_interval) if options.optimize else {}),
    )  # fmt: skip


def sample_video(pipe, condition, options: GenerateOptions, seed: int) -> list:
    """The frames (PIL images) of one video."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with use_backend(options.backend):
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
    return generate_video(image, out, GenerateOptions(model=str(model), **options))


def generate_video(image: str | Path, out: str | Path, options: GenerateOptions) -> dict[str, Any]:
    """:func:`generate` with the options as a :class:`GenerateOptions`. Everything is checked (OptionError,
    ModelFolderError, :class:`svd_fast.media.MediaError`: all ValueErrors) before the model loads."""
    media.output_kind(out)
    options = check_options(options)
    out = Path(out)
    condition = media.load_image(image, max_size=(options.width, options.height))

    started = time.perf_counter()
    pipe = pipeline_for(options)
    if options.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loaded = time.perf_counter()
    frames = sample_video(pipe, condition, options, options.seed)
    sampled = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
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
        "optimized": describe(pipe) if options.optimize else {},
        "backends_used": backends_used(),
        "seconds": {"load": round(loaded - started, 2), "sample_and_decode": round(sampled - loaded, 2), "write": round(time.perf_counter() - sampled, 2)},
        "peak_memory_gib": round(peak / 2**30, 3),
        "peak_memory_kind": "CUDA allocated" if options.device == "cuda" else "process max RSS",
    }
