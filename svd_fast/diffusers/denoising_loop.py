"""The optimized pipeline's ``__call__``: diffusers' StableVideoDiffusionPipeline.__call__ with svd_fast's
fused denoising loop (:func:`svd_fast.sampling.sample`).

Per step the stock loop concatenates the CFG batch, scales it, concatenates the conditioning latents, runs
the UNet, applies guidance and calls the scheduler: five passes over the latents besides the UNet. Here
one fused op prepares the UNet input (c_in scaling, conditioning concat, CFG doubling with zero
conditioning for the unconditional half) and one applies the frame-ramped guidance, the v-prediction
denoiser and the Euler (or a multistep sampler's) update; with consistency sampling (an SVDConsistencyScheduler),
the guided denoiser's output re-noised to the next level (:mod:`svd_fast.sampling.consistency`). Everything else (image encoding, conditioning, noise,
decoding, callbacks, outputs) is diffusers' code path, so the result equals the stock pipeline's within
float32 rounding for the Euler sampler.

:func:`fused_pipeline_class` gives the subclass that :func:`svd_fast.optimize` assigns to the pipeline's
``__class__`` (``restore`` assigns the original back). The class keeps diffusers' name and the scheduler stays
the pipeline's own diffusers scheduler, so save_pretrained writes files stock diffusers loads. The loop runs only
for schedulers it reproduces (:func:`fused_loop_unsupported_reason`); with any other (e.g. a scheduler swapped in
after ``optimize``) the pipeline runs diffusers' own loop with that scheduler.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import PIL.Image
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
    StableVideoDiffusionPipelineOutput,
    retrieve_timesteps,
)
from diffusers.utils.torch_utils import randn_tensor

from svd_fast import backends
from svd_fast.diffusers.consistency_scheduler import SVDConsistencyScheduler
from svd_fast.diffusers.scheduler import FusedEulerDiscreteScheduler
from svd_fast.diffusers.step_cache import CachedUNetStep
from svd_fast.diffusers.tiny import SVD_SCHEDULER_CONFIG
from svd_fast.sampling.consistency import consistency_sample
from svd_fast.sampling.samplers import sample

_SETTINGS_ATTRIBUTE = "_svd_fast_sampling"
# A svd_fast.diffusers.parallel.ParallelPlan: its ``wrap`` splits each UNet call over a process group.
PARALLEL_ATTRIBUTE = "_svd_fast_parallel"

# Scheduler classes whose deterministic v-prediction step the fused loop reproduces (exact classes: a subclass may
# change the step). A sampler that replaces the scheduler's step with a fused one registers its class here.
FUSED_SCHEDULERS: set[type] = {EulerDiscreteScheduler, FusedEulerDiscreteScheduler}


def fused_loop_unsupported_reason(scheduler: Any, sampler: str = "euler") -> str | None:
    """None when the fused loop reproduces ``scheduler``'s sampling with ``sampler``, else why not: consistency
    sampling takes an SVDConsistencyScheduler, the ODE samplers a v-prediction Euler scheduler."""
    if sampler == "consistency":
        if type(scheduler) is not SVDConsistencyScheduler:
            return f"consistency sampling needs an SVDConsistencyScheduler, the pipeline has {type(scheduler).__name__}"
        return None
    if type(scheduler) not in FUSED_SCHEDULERS:
        names = ", ".join(sorted(cls.__name__ for cls in FUSED_SCHEDULERS))
        return f"the fused loop reproduces {names} only, the pipeline has {type(scheduler).__name__}"
    if scheduler.config.get("prediction_type") != "v_prediction":
        return f"the fused loop needs prediction_type 'v_prediction', the scheduler has {scheduler.config.get('prediction_type')!r}"
    return None


class FusedDenoisingLoop:
    """Mixin for a StableVideoDiffusionPipeline subclass: ``__call__`` with the fused denoising loop. The
    settings (backend, sampler, cache_interval) are the dict in the instance attribute ``_svd_fast_sampling``."""

    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image | list[PIL.Image.Image] | torch.Tensor,
        height: int = 576,
        width: int = 1024,
        num_frames: int | None = None,
        num_inference_steps: int = 25,
        sigmas: list[float] | None = None,
        min_guidance_scale: float = 1.0,
        max_guidance_scale: float = 3.0,
        fps: int = 7,
        motion_bucket_id: int = 127,
        noise_aug_strength: float = 0.02,
        decode_chunk_size: int | None = None,
        num_videos_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str | None = "pil",
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        return_dict: bool = True,
    ):
        """As StableVideoDiffusionPipeline.__call__ (same arguments and outputs). With a scheduler the fused loop
        does not reproduce, diffusers' own loop runs (svd_fast's kernels stay in the UNet and VAE)."""
        arguments = _arguments(locals())
        settings = getattr(self, _SETTINGS_ATTRIBUTE)
        reason = fused_loop_unsupported_reason(self.scheduler, settings["sampler"])
        if reason is not None:
            if getattr(self, PARALLEL_ATTRIBUTE, None) is not None:
                raise ValueError(f"scheduler: {reason}; a parallelized pipeline needs the fused loop (use an EulerDiscreteScheduler)")
            if settings["sampler"] != "euler" or settings["cache_interval"] > 1:
                raise ValueError(f"scheduler: {reason}, and optimize(sampler={settings['sampler']!r}, cache_interval="
                                 f"{settings['cache_interval']}) needs the fused loop; use an EulerDiscreteScheduler or "
                                 "optimize with sampler='euler', cache_interval=1")
            warnings.warn(f"svd_fast: {reason}; running diffusers' denoising loop with it", stacklevel=2)
            call = super().__call__
        else:
            call = self._fused_call
        if settings["backend"] == "auto":
            return call(**arguments)
        with backends.use_backend(settings["backend"]):
            return call(**arguments)

    def _fused_call(
        self, image, height, width, num_frames, num_inference_steps, sigmas, min_guidance_scale, max_guidance_scale,
        fps, motion_bucket_id, noise_aug_strength, decode_chunk_size, num_videos_per_prompt, generator, latents,
        output_type, callback_on_step_end, callback_on_step_end_tensor_inputs, return_dict,
    ):  # fmt: skip
        settings = getattr(self, _SETTINGS_ATTRIBUTE)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        num_frames = num_frames if num_frames is not None else self.unet.config.num_frames
        decode_chunk_size = decode_chunk_size if decode_chunk_size is not None else num_frames
        tensor_inputs = ["latents"] if callback_on_step_end_tensor_inputs is None else callback_on_step_end_tensor_inputs
        unknown = [name for name in tensor_inputs if name not in self._callback_tensor_inputs]
        if callback_on_step_end is not None and unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {unknown} are not in {self._callback_tensor_inputs}")

        self.check_inputs(image, height, width)
        batch_size = 1 if isinstance(image, PIL.Image.Image) else len(image) if isinstance(image, list) else image.shape[0]
        device = self._execution_device
        self._guidance_scale = max_guidance_scale
        do_cfg = self.do_classifier_free_guidance
        image_embeddings = self._encode_image(image, device, num_videos_per_prompt, do_cfg)
        fps = fps - 1  # SVD was conditioned on fps - 1 (as diffusers' pipeline)

        image = self.video_processor.preprocess(image, height=height, width=width).to(device)
        noise = randn_tensor(image.shape, generator=generator, device=device, dtype=image.dtype)
        image = image + noise_aug_strength * noise
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.vae.to(dtype=torch.float32)
        # (B, C, H, W) without the CFG zeros: the fused input preparation adds them and repeats over frames.
        image_latents = self._encode_vae_image(image, device, num_videos_per_prompt, False).to(image_embeddings.dtype)
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        added_time_ids = self._get_add_time_ids(
            fps, motion_bucket_id, noise_aug_strength, image_embeddings.dtype, batch_size, num_videos_per_prompt, do_cfg
        ).to(device)

        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, None, sigmas)
        latents = self.prepare_latents(
            batch_size * num_videos_per_prompt, num_frames, self.unet.config.in_channels, height, width,
            image_embeddings.dtype, device, generator, latents,
        )  # fmt: skip
        guidance = torch.linspace(min_guidance_scale, max_guidance_scale, num_frames).unsqueeze(0)
        guidance = guidance.to(device, latents.dtype).repeat(batch_size * num_videos_per_prompt, 1)[:, :, None, None, None]
        self._guidance_scale = guidance
        self._num_timesteps = len(timesteps)

        cached_unet = CachedUNetStep(self.unet, settings["cache_interval"]) if settings["cache_interval"] > 1 else None

        def unet_call(sample: torch.Tensor, timestep, context: torch.Tensor, time_ids: torch.Tensor, step: int) -> torch.Tensor:
            if cached_unet is not None:
                return cached_unet(sample, timestep, context, time_ids, step)
            return self.unet(sample, timestep, encoder_hidden_states=context, added_time_ids=time_ids, return_dict=False)[0]

        plan = getattr(self, PARALLEL_ATTRIBUTE, None)
        if plan is not None:
            unet_call = plan.wrap(unet_call)

        def unet_step(model_input: torch.Tensor, step: int) -> torch.Tensor:
            return unet_call(model_input, timesteps[step], image_embeddings, added_time_ids, step)

        with self.progress_bar(total=num_inference_steps) as progress_bar:

            def on_step_end(step: int, latents: torch.Tensor) -> torch.Tensor:
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(self, step, timesteps[step], {name: latents for name in tensor_inputs})
                    latents = outputs.pop("latents", latents)
                progress_bar.update()
                return latents

            if settings["sampler"] == "consistency":
                config = self.scheduler.config
                shape, dtype = latents.shape, latents.dtype

                def noise(_step: int) -> torch.Tensor:
                    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

                latents = consistency_sample(
                    unet_step, latents, image_latents, self.scheduler.sigmas, guidance if do_cfg else None, noise,
                    config.s_noise, config.clip_denoised, config.sigma_data, on_step_end,
                )  # fmt: skip
            else:
                latents = sample(
                    unet_step, latents, image_latents, self.scheduler.sigmas, guidance if do_cfg else None,
                    sampler=settings["sampler"], on_step_end=on_step_end,
                )  # fmt: skip

        if output_type == "latent":
            frames = latents
        else:
            if needs_upcasting:
                self.vae.to(dtype=torch.float16)
            frames = self.decode_latents(latents, num_frames, decode_chunk_size)
            frames = self.video_processor.postprocess_video(video=frames, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return frames
        return StableVideoDiffusionPipelineOutput(frames=frames)


def _arguments(call_locals: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in call_locals.items() if name not in ("self", "__class__")}


_CLASSES: dict[type, type] = {}


def fused_pipeline_class(pipeline_class: type) -> type:
    """The subclass of ``pipeline_class`` whose ``__call__`` runs the fused loop (one per class, reused)."""
    if pipeline_class not in _CLASSES:
        _CLASSES[pipeline_class] = type(
            pipeline_class.__name__, (FusedDenoisingLoop, pipeline_class), {"__module__": pipeline_class.__module__}
        )
    return _CLASSES[pipeline_class]


def pop_attribute(target: Any, name: str) -> None:
    """Remove an instance attribute that shadows the class's (an undo step of optimize())."""
    vars(target).pop(name, None)


def fuse_denoising_loop(
    pipe: Any, backend: str, sampler: str, cache_interval: int, undo: list[tuple], report: Counter
) -> None:
    """optimize()'s sampling patch: the fused loop's class and its settings, each undoable. The scheduler stays the
    pipeline's own diffusers scheduler (the loop fuses its step), so a saved pipeline names a diffusers scheduler,
    except where the sampler needs another kind: consistency sampling keeps the pipeline's SVDConsistencyScheduler
    (or, on an Euler pipeline, takes one with AnimateLCM-SVD-xt's config), and an ODE sampler on a consistency
    pipeline takes diffusers' EulerDiscreteScheduler with SVD's config."""
    original_scheduler, original_class = pipe.scheduler, type(pipe)
    if sampler == "consistency":
        if not isinstance(original_scheduler, SVDConsistencyScheduler):
            pipe.scheduler = SVDConsistencyScheduler()
    elif isinstance(original_scheduler, SVDConsistencyScheduler):
        pipe.scheduler = EulerDiscreteScheduler.from_config(SVD_SCHEDULER_CONFIG)
    undo.append((setattr, pipe, "scheduler", original_scheduler))
    setattr(pipe, _SETTINGS_ATTRIBUTE, {"backend": backend, "sampler": sampler, "cache_interval": cache_interval})
    undo.append((pop_attribute, pipe, _SETTINGS_ATTRIBUTE))
    pipe.__class__ = fused_pipeline_class(original_class)
    undo.append((setattr, pipe, "__class__", original_class))
    report[f"scheduler -> {type(pipe.scheduler).__name__}"] += 1
    report[f"denoising loop -> fused input preparation + guidance + {sampler} step"] += 1
    if cache_interval > 1:
        report[f"UNet step caching: deep features reused for {cache_interval - 1} of every {cache_interval} steps"] += 1
