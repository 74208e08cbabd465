"""Videos longer than the model's window with a StableVideoDiffusionPipeline (stock or optimized):
:func:`generate_long_video`.

SVD is trained on 14 (SVD) or 25 (SVD-XT) frames; sampling many more at once costs memory linearly and, on the
released checkpoints, degrades. Chaining windows by hand (the next window conditioned on the last frame of the
previous one) restarts the motion at every seam: the new window knows one still frame, not where things were
going. Here, with N frames in windows of W (the UNet config's ``num_frames`` by default) sharing K frames:

1. one noise tensor is drawn for the whole video, and each window starts from its slice of it (shared frames
   start from the same noise in both windows);
2. window k is conditioned on the first frame it shares with the video so far (decoded from the latents), so
   its first frame, which SVD reproduces from the conditioning image, is that frame;
3. while window k samples, its K shared frames are held to the video's latents brought to the current noise level
   with their own noise (``x = known + sigma * noise``, replacement as in inpainting by diffusion) for the first
   ``hold`` fraction of the steps: the other W - K frames are denoised in the temporal attention's view of the
   known motion, and so continue it;
4. the K shared frames' final latents are blended linearly (previous window's weight K/(K+1) down to 1/(K+1));
5. the whole N-frame latent video is decoded once (``decode_chunk_size`` frames at a time).

The last window is moved back to end at frame N (it then shares more than K frames). ``overlap=0`` is the naive
chaining: window k is conditioned on the last frame of window k - 1 and all its W frames are appended (the first
one repeats that frame). Limits: the windows only see K frames of the past, so slow changes (a drift in colour,
an object leaving and coming back) are not kept consistent over the whole video; each window costs a full
sampling run, so the cost is (N - K) / (W - K) windows; the image conditioning drifts with the generated frames
it is taken from (errors accumulate); held frames constrain the motion only as far as the model's temporal
attention follows them. bench/RESULTS.md measures the seams on the demo world.
"""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch

from svd_fast.sampling.long_video import blend, check_long_video, overlap_replacement, window_starts

__all__ = ["generate_long_video"]

# Arguments generate_long_video sets itself for every window.
_OWN_ARGUMENTS = ("num_frames", "latents", "generator", "output_type", "callback_on_step_end", "callback_on_step_end_tensor_inputs", "return_dict")


@torch.no_grad()
def _decoded_frame(pipe: Any, latents: torch.Tensor) -> PIL.Image.Image:
    """The conditioning image of a window: one latent frame (B=1, 1, C, h, w) decoded."""
    frames = pipe.decode_latents(latents, 1, 1)
    return pipe.video_processor.postprocess_video(video=frames, output_type="pil")[0][0]


def _holding(pipe: Any, known: torch.Tensor, noise: torch.Tensor, hold_steps: int):
    """callback_on_step_end setting the shared frames to ``known`` at the next step's noise level."""
    shared = known.shape[1]

    def callback(pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        latents = tensors["latents"]
        if step < hold_steps:
            sigma = float(pipeline.scheduler.sigmas[step + 1])
            latents = latents.clone()
            latents[:, :shared] = overlap_replacement(known, noise[:, :shared], sigma).to(latents.dtype)
        return {"latents": latents}

    return callback


@torch.no_grad()
def generate_long_video(
    pipe: Any,
    image: PIL.Image.Image,
    num_frames: int,
    window: int | None = None,
    overlap: int = 2,
    hold: float = 1.0,
    seed: int = 0,
    output_type: str = "pil",
    decode_chunk_size: int | None = None,
    **call_arguments: Any,
):
    """``num_frames`` frames animated from ``image`` by ``pipe`` in windows of ``window`` frames (default: the
    UNet's ``num_frames``) sharing ``overlap`` frames (method and limits: module docstring). ``hold``: the fraction
    of each window's steps during which the shared frames are held to the video so far (0: only the blend joins
    the windows). ``seed`` draws the video's noise (window k's conditioning noise uses ``seed + k``): the same
    arguments give the same video. ``call_arguments`` go to every window's pipeline call (height, width,
    num_inference_steps, guidance, fps, motion_bucket_id, noise_aug_strength, ...).

    Returns the frames as the pipeline would for one video (``output_type`` "pil": a list of N images, "np":
    (N, H, W, 3), "pt": (N, 3, H, W)), or with ``output_type="latent"`` the (1, N, C, h, w) latent video.
    """
    window = pipe.unet.config.num_frames if window is None else window
    check_long_video(num_frames, window, overlap)
    if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not 0.0 <= hold <= 1.0:
        raise ValueError(f"hold must be a number in [0, 1], got {hold!r}")
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    reserved = sorted(set(call_arguments) & set(_OWN_ARGUMENTS))
    if reserved:
        raise ValueError(f"generate_long_video sets {reserved} itself for each window; leave them out")
    window = min(window, num_frames)
    height = call_arguments.setdefault("height", pipe.unet.config.sample_size * pipe.vae_scale_factor)
    width = call_arguments.setdefault("width", pipe.unet.config.sample_size * pipe.vae_scale_factor)
    steps = call_arguments.get("num_inference_steps", 25)
    channels = pipe.unet.config.in_channels // 2  # the UNet input is the noisy latents + the conditioning latents
    shape = (1, num_frames, channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    device, dtype = pipe._execution_device, pipe.unet.dtype  # noqa: SLF001 - diffusers' own device rule (offload aware)
    # The pipeline scales given latents by init_noise_sigma: x_0 = sigma_max-ish * noise, as for its own draw.
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(device, dtype)

    video: torch.Tensor | None = None
    starts = window_starts(num_frames, window, overlap)
    for index, start in enumerate(starts):
        shared = 0 if video is None else video.shape[1] - start
        window_noise = noise[:, start : start + window].clone()
        callback = None
        if video is None:
            condition = image
        elif shared == 0:
            condition = _decoded_frame(pipe, video[:, -1:])
        else:
            condition = _decoded_frame(pipe, video[:, start : start + 1])
            known = video[:, start:]
            init_sigma = float(pipe.scheduler.init_noise_sigma) if hasattr(pipe.scheduler, "init_noise_sigma") else 1.0
            if hold > 0:
                # The starting latents of the shared frames are the known ones at the first noise level too.
                pipe.scheduler.set_timesteps(steps, device=device)
                first_sigma = float(pipe.scheduler.sigmas[0])
                window_noise[:, :shared] = overlap_replacement(known, window_noise[:, :shared], first_sigma) / init_sigma
            callback = _holding(pipe, known, noise[:, start : start + shared], round(hold * steps))
        latents = pipe(
            condition, num_frames=window, latents=window_noise, generator=torch.Generator().manual_seed(seed + index),
            output_type="latent", callback_on_step_end=callback, **call_arguments,
        ).frames  # fmt: skip
        if video is None:
            video = latents
        else:
            video = torch.cat([video[:, :start], blend(video[:, start:], latents[:, :shared]), latents[:, shared:]], dim=1)

    if output_type == "latent":
        return video
    frames = pipe.decode_latents(video, num_frames, decode_chunk_size or window)
    return pipe.video_processor.postprocess_video(video=frames, output_type=output_type)[0]
