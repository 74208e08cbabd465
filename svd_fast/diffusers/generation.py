"""Image-to-video generation with an SVD / SVD-XT pipeline, optimized by svd_fast: the library behind
``svd-fast generate`` (one image; a batch is :mod:`svd_fast.diffusers.generation_batch`).

* :class:`GenerateOptions` and :func:`check_options`: every setting but the image and the output path, checked
  and completed before the model loads (an :class:`~svd_fast.diffusers.settings.OptionError` naming the field);
* :func:`load_optimized_pipeline`: the one way svd_fast loads a pipeline (generation, the demo, training's
  validation samples), optionally around components the caller already holds;
* :func:`sample_video` and :func:`generate`: one video (in windows when ``frames`` exceeds ``window``:
  :mod:`svd_fast.diffusers.long_video`), with LoRA adapters (``lora``: :func:`svd_fast.load_lora`, fused).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import StableVideoDiffusionPipeline

from svd_fast import checks, media
from svd_fast.backends import backends_used, use_backend
from svd_fast.diffusers.consistency_scheduler import SVDConsistencyScheduler
from svd_fast.diffusers.loading import ModelFolderError, check_model_folder, check_variant
from svd_fast.diffusers.long_video import generate_long_video
from svd_fast.diffusers.patching import describe, optimize
from svd_fast.diffusers.sampling_settings import read_sampling_settings
from svd_fast.diffusers.settings import OptionError, check_settings
from svd_fast.diffusers.unet_weights import UNetWeightsError, check_unet_weights, check_weights_file, load_unet_weights
from svd_fast.heartbeat import heartbeat
from svd_fast.sampling.consistency import ANIMATELCM_SVD_CONFIG, DEFAULT_CONSISTENCY_STEPS
from svd_fast.sampling.guidance import GUIDANCE_PRESETS

# Frames the VAE decodes at once unless told otherwise (bench/RESULTS.md, "VAE decode once steps are few"): the
# temporal decoder holds 1.125 GiB per 576x1024 frame in fp16, so 8 frames (9.0 GiB) stay under the peak of an
# SVD-XT UNet step with CFG (9.27 GiB) and decoding never raises generation's peak, which decoding all 25 frames
# at once would (28.1 GiB). Measured on CPU, chunks of 8 cost no more decode time than all frames at once.
DECODE_CHUNK_SIZE = 8
LOW_MEMORY_DECODE_CHUNK_SIZE = 2


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
    sampler: str = "auto"  # "auto": consistency for a folder whose svd_fast.json says so (svd-fast distill), else euler
    cache_interval: int = 1
    progress: bool = True
    unet_weights: str | None = None  # a UNet state dict (.safetensors) loaded over the model's UNet, strictly
    lora: list[str] = dataclasses.field(default_factory=list)  # "PATH" or "PATH:SCALE" each
    window: int | None = None  # frames per window of a long video (None: the UNet's num_frames)
    overlap: int = 2  # frames two windows of a long video share


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


def _check(name: str, value: Any) -> None:
    """``value`` under svd_fast.checks' rule for ``name``, as an OptionError spelled by the caller."""
    try:
        checks.check(name, value, spelled="{" + name + "}")
    except checks.CheckError as error:
        raise OptionError(str(error)) from None


def check_options(options: GenerateOptions) -> GenerateOptions:
    """Raise OptionError (a ValueError naming the field) or ModelFolderError for any bad option, and fill in
    every default that needs no model load."""
    if _looks_like_path(options.model):
        check_model_folder(Path(options.model).expanduser())
        if options.variant is not None:
            check_variant(Path(options.model).expanduser(), options.variant)
    for name in ("seed", "frames", "steps", "fps", "decode_chunk_size", "cache_interval", "motion_bucket_id", "noise_aug_strength",
                 "height", "width"):  # fmt: skip
        _check(name, getattr(options, name))
    if options.guidance_preset not in GUIDANCE_PRESETS:
        raise OptionError("{guidance_preset} must be one of {choices}, got {got!r}", choices=tuple(GUIDANCE_PRESETS), got=options.guidance_preset)
    preset = GUIDANCE_PRESETS[options.guidance_preset]
    few_step = _few_step_settings(options.model)
    sampler = options.sampler if options.sampler != "auto" else "consistency" if few_step is not None else "euler"
    # Few-step models run without classifier-free guidance unless asked (AnimateLCM-SVD-xt's batch script).
    default_guidance = (preset.min_guidance, preset.max_guidance)
    if sampler == "consistency":
        default_guidance = (few_step["min_guidance"], few_step["max_guidance"]) if few_step else (1.0, 1.0)
    minimum = default_guidance[0] if options.min_guidance is None else options.min_guidance
    maximum = default_guidance[1] if options.max_guidance is None else options.max_guidance
    _check("min_guidance", minimum)
    _check("max_guidance", maximum)
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
    window = default_frames if options.window is None else options.window
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise OptionError("{window} must be an integer >= 2, got {got!r}", got=window)
    if isinstance(options.overlap, bool) or not isinstance(options.overlap, int) or not 0 <= options.overlap < window:
        raise OptionError("{overlap} must be in [0, {window}) = [0, {limit}), got {got!r}", "windows must advance", limit=window, got=options.overlap)
    loras = [parse_lora(argument) for argument in options.lora]
    steps = preset.num_inference_steps if options.steps is None else options.steps
    if sampler == "consistency":
        steps = _consistency_steps(options.steps, few_step)
    if options.unet_weights is not None:
        _check_unet_weights(options.unet_weights, config)

    try:
        device = checks.parse_device(options.device, spelled="{device}")
    except checks.CheckError as error:
        raise OptionError(str(error)) from None
    dtype = options.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    torch_dtype = check_settings(
        backend=options.backend, dtype=dtype, device=device, low_memory=options.low_memory, attention=options.attention,
        cuda_graphs=options.cuda_graphs, sampler=sampler, cache_interval=options.cache_interval,
        optimized=options.optimize,
    )  # fmt: skip
    reason = checks.backend_unavailable_reason(options.backend, device, torch_dtype)
    if reason is not None:
        raise OptionError("{backend} {name} cannot run on {where}: {reason}", "use {backend} auto", name=options.backend, where=device, reason=reason)
    active = window if options.window is not None and frames > window else frames  # a long video holds one window at a time
    decode_chunk = decode_chunk_size(options, active)
    try:
        checks.check_generation_memory(active, height, width, decode_chunk, torch_dtype.itemsize, device, spelled="{frames} x {height} x {width}")
    except checks.CheckError as error:
        raise OptionError(str(error)) from None
    return dataclasses.replace(
        options, height=height, width=width, frames=frames, steps=steps, min_guidance=minimum, max_guidance=maximum,
        device=device, dtype=dtype, sampler=sampler, window=window, lora=[f"{path}:{scale}" for path, scale in loras],
    )  # fmt: skip


def _few_step_settings(model: str) -> dict[str, Any] | None:
    """The model folder's checked svd_fast.json (svd-fast distill's students), None without one."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return None
    try:
        return read_sampling_settings(path)
    except ValueError as error:
        raise OptionError("{why}", "fix or remove the file", why=str(error)) from None


def _consistency_steps(steps: int | None, few_step: dict[str, Any] | None) -> int:
    limit = (few_step["scheduler_config"] if few_step else ANIMATELCM_SVD_CONFIG)["num_train_timesteps"]
    if steps is None:
        return few_step["num_inference_steps"] if few_step else DEFAULT_CONSISTENCY_STEPS
    if steps > limit:
        raise OptionError("{steps} {got} exceeds the consistency scheduler's num_train_timesteps ({limit})",
                          "a consistency model samples at most at the noise levels it was trained on", got=steps, limit=limit)
    return steps


def _check_unet_weights(path: str, config: dict[str, Any] | None) -> None:
    """The file is the state dict of the model's UNet (from its header; a hub model's is compared on loading)."""
    try:
        if config is not None:
            check_unet_weights(path, config["unet"])
        else:
            check_weights_file(path)
    except UNetWeightsError as error:
        raise OptionError("{unet_weights} {why}", "pass a state dict of this model's UNet", why=str(error)) from None


def consistency_scheduler_for(model: str | Path):
    """The SVDConsistencyScheduler of ``model``'s svd_fast.json, else with AnimateLCM-SVD-xt's config."""
    few_step = _few_step_settings(str(model))
    return SVDConsistencyScheduler.from_config(few_step["scheduler_config"] if few_step else {})


def parse_lora(argument: str) -> tuple[str, float]:
    """``"PATH"`` or ``"PATH:SCALE"`` -> (path, scale), the adapter file read and checked (not yet against a UNet)."""
    from svd_fast.diffusers.lora import read_lora  # noqa: PLC0415 - safetensors, only when adapters are asked for

    path, _, scale_text = str(argument).rpartition(":")
    try:
        scale = float(scale_text)
    except ValueError:
        path, scale = str(argument), 1.0
    if not path or not math.isfinite(scale):
        raise OptionError("{lora} {got!r}: expected PATH or PATH:SCALE with a finite SCALE", got=argument)
    if not Path(path).expanduser().exists():
        raise OptionError("{lora} {got!r} does not exist", "pass an adapter folder or .safetensors file", got=path)
    try:
        read_lora(path)
    except ValueError as error:
        raise OptionError("{lora}: {detail}", detail=str(error)) from None
    return path, scale


def load_optimized_pipeline(
    model: str | Path,
    *,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device | None = None,
    optimized: bool = True,
    progress: bool = True,
    variant: str | None = None,
    components: dict[str, Any] | None = None,
    unet_weights: str | Path | None = None,
    **settings: Any,
) -> StableVideoDiffusionPipeline:
    """The StableVideoDiffusionPipeline at ``model`` (a local diffusers folder, or a hub id where the network
    allows), moved to ``device`` (None: left where it loads; not moved with ``low_memory``, whose offload
    places each model) and, when ``optimized``, patched by :func:`svd_fast.optimize` with ``settings``
    (its keyword arguments). ``components`` (e.g. ``vae=``, ``scheduler=``) are taken as given instead of
    being loaded; ``unet_weights``: a UNet state dict (.safetensors) loaded over the UNet, strictly, before
    optimizing. ModelFolderError names what is wrong with ``model``."""
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
    if unet_weights is not None:
        load_unet_weights(pipe.unet, unet_weights)
    if device is not None and not settings.get("low_memory", False):
        pipe = pipe.to(device)
    if optimized:
        optimize(pipe, **settings)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def pipeline_for(options: GenerateOptions) -> StableVideoDiffusionPipeline:
    """The pipeline of checked ``options``, on its device, optimized as asked, its LoRA adapters fused."""
    from svd_fast.diffusers.lora import load_lora  # noqa: PLC0415 - safetensors and peft load only when adapters are asked for

    components = {"scheduler": consistency_scheduler_for(options.model)} if options.sampler == "consistency" else None
    # low_memory leaves the pipeline where it loads: optimize()'s CPU offload places each model.
    pipe = load_optimized_pipeline(
        options.model, dtype=options.dtype, device=None if options.low_memory else options.device, optimized=options.optimize,
        progress=options.progress, components=components, unet_weights=options.unet_weights, variant=options.variant,
        **(dict(backend=options.backend, low_memory=options.low_memory, attention=options.attention, cuda_graphs=options.cuda_graphs,
                sampler=options.sampler, cache_interval=options.cache_interval) if options.optimize else {}),
    )  # fmt: skip
    for argument in options.lora:
        path, scale = parse_lora(argument)
        try:
            load_lora(pipe, path, scale=scale)
        except ValueError as error:  # an adapter for another UNet
            raise OptionError("{lora}: {detail}", detail=str(error)) from None
    return pipe


def decode_chunk_size(options: GenerateOptions, frames: int) -> int:
    """Frames per VAE decode: the option, else DECODE_CHUNK_SIZE (LOW_MEMORY_DECODE_CHUNK_SIZE with
    low_memory), at most ``frames``."""
    if options.decode_chunk_size:
        return options.decode_chunk_size
    return min(frames, LOW_MEMORY_DECODE_CHUNK_SIZE if options.low_memory else DECODE_CHUNK_SIZE)


def sample_video(pipe, condition, options: GenerateOptions, seed: int) -> list:
    """The frames (PIL images) of one video."""
    if options.window is not None and options.frames > options.window:
        with use_backend(options.backend):
            return generate_long_video(
                pipe, condition, options.frames, window=options.window, overlap=options.overlap, seed=seed,
                decode_chunk_size=decode_chunk_size(options, options.window),
                height=options.height, width=options.width, num_inference_steps=options.steps,
                min_guidance_scale=options.min_guidance, max_guidance_scale=options.max_guidance, fps=options.fps,
                motion_bucket_id=options.motion_bucket_id, noise_aug_strength=options.noise_aug_strength,
            )  # fmt: skip
    generator = torch.Generator(device="cpu").manual_seed(seed)
    stage = f"sampling and decoding {options.frames} frames {options.height}x{options.width}"
    with use_backend(options.backend), heartbeat(stage) if options.progress else contextlib.nullcontext():
        result = pipe(
            condition, height=options.height, width=options.width, num_frames=options.frames,
            num_inference_steps=options.steps, min_guidance_scale=options.min_guidance,
            max_guidance_scale=options.max_guidance, fps=options.fps, motion_bucket_id=options.motion_bucket_id,
            noise_aug_strength=options.noise_aug_strength,
            decode_chunk_size=decode_chunk_size(options, options.frames),
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
    media.check_output(out, [image])
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
    written = media.write_frames(frames, out, fps=options.fps, inputs=[image])
    peak = torch.cuda.max_memory_allocated() if options.device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "out": str(written),
        "frames": options.frames,
        "window": options.window if options.frames > options.window else None,
        "lora": options.lora,
        "size": [options.height, options.width],
        "steps": options.steps,
        "guidance": [options.min_guidance, options.max_guidance],
        "sampler": options.sampler,
        "unet_weights": options.unet_weights,
        "cache_interval": options.cache_interval,
        "device": options.device,
        "dtype": options.dtype,
        "optimized": describe(pipe) if options.optimize else {},
        "backends_used": backends_used(),
        "seconds": {"load": round(loaded - started, 2), "sample_and_decode": round(sampled - loaded, 2), "write": round(time.perf_counter() - sampled, 2)},
        "peak_memory_gib": round(peak / 2**30, 3),
        "peak_memory_kind": "CUDA allocated" if options.device == "cuda" else "process max RSS",
    }
