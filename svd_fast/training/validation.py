"""Validation samples during training: every ``validation.every`` steps, one short clip per held-out first frame
(``validation.images``), sampled with the EMA weights (the fp32 master weights when EMA is off) through the
pipeline ``svd-fast generate`` runs (diffusers' StableVideoDiffusionPipeline, optimized by svd_fast when
``use_svd_fast_kernels``), written as ``OUTPUT_DIR/validation/step_NNNNNN/image_I.mp4`` (the step's folder
appears whole, by rename) and named in that step's train_log.jsonl record.

The sampling UNet is a separate copy of the base UNet in the training precision (with the LoRA adapters in
``lora`` mode), and the VAE a copy of the training one (svd_fast's ``optimize`` patches the VAE too, and the
training VAE must keep encoding exactly as it did, for bit-exact resumes): both are kept on the CPU between
validations and on the training device only while they sample, which decodes ``validation.decode_chunk``
frames at a time. The memory plan's ``validation`` row counts them (svd_fast.training.memory_plan).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from svd_fast import _io, media
from svd_fast.training.config import DataSection, ValidationSection, default_vae_chunk
from svd_fast.training.lora import add_lora

VALIDATION_DIR = "validation"


def load_validation_images(validation: ValidationSection, data: DataSection) -> list:
    """The held-out first frames as RGB PIL images (at most the clips' size); ValueError naming ``validation.images``
    for a bad file."""
    images = []
    for path in validation.images:
        try:
            images.append(media.load_image(path, max_size=(data.width, data.height)))
        except media.MediaError as error:
            raise ValueError(f"validation.images: {str(error).removeprefix('--image: ')}") from None
    return images


@dataclass(frozen=True)
class SamplingModel:
    """The pipeline validation samples with: the base pipeline folder, its weights variant, svd_fast's kernels,
    the LoRA adapters (a peft LoraConfig) when those are trained, and the UNet's dtype."""

    model: str
    variant: str | None = None
    optimized: bool = True
    lora: Any = None
    dtype: str = "fp32"  # the sampling UNet's dtype: the trainer samples in its training precision


class Validator:
    """Samples the validation clips on rank 0 from the trained parameters' full fp32 values."""

    def __init__(self, settings: ValidationSection, data: DataSection, seed: int, sampling: SamplingModel, base_pipeline,
                 device: torch.device, output_dir: Path, images: list, scheduler=None, call_options: dict | None = None) -> None:
        """``data``: the clips' size, fps and motion bucket (sampled as trained); ``images``: the held-out first
        frames, as :func:`load_validation_images` read them; ``scheduler``: sample with it instead of the base
        pipeline's; ``call_options``: extra pipeline arguments (``svd-fast distill`` validates its student with
        consistency sampling at guidance 1)."""
        self.settings = settings
        self.data = data
        self.seed = seed
        self.sampling = sampling
        self.scheduler = scheduler
        self.call_options = call_options or {}
        self.base = base_pipeline
        self.device = device
        self.folder = output_dir / VALIDATION_DIR
        self.images = images
        self._pipeline = None

    def _sampling_pipeline(self):
        """Built on first use: the base pipeline's frozen parts around a fresh UNet in ``sampling.dtype``."""
        if self._pipeline is None:
            from svd_fast.diffusers.generation import load_optimized_pipeline  # noqa: PLC0415 - diffusers loads only when a model is built

            components = {
                "vae": copy.deepcopy(self.base.vae).to("cpu"), "image_encoder": self.base.image_encoder,
                "scheduler": copy.deepcopy(self.scheduler or self.base.scheduler), "feature_extractor": self.base.feature_extractor,
            }  # fmt: skip
            sampling = self.sampling
            pipe = load_optimized_pipeline(sampling.model, dtype=sampling.dtype, optimized=sampling.optimized, progress=False, variant=sampling.variant,
                                           components=components)  # fmt: skip
            if sampling.lora is not None:
                add_lora(pipe.unet, sampling.lora)
            self._pipeline = pipe
        return self._pipeline

    @torch.no_grad()
    def run(self, step: int, trained_state: dict[str, torch.Tensor]) -> list[str]:
        """Sample every validation image with ``trained_state`` (the trained parameters' full fp32 tensors) and
        write the step's folder; returns the clips' paths."""

        data = self.data
        pipe = self._sampling_pipeline()
        _, unexpected = pipe.unet.load_state_dict(trained_state, strict=False)
        if unexpected:
            raise RuntimeError(f"validation: parameter names do not match the sampling UNet (unexpected {unexpected[:3]})")
        encoder_device = next(pipe.image_encoder.parameters()).device
        for model in (pipe.unet, pipe.vae, pipe.image_encoder):
            model.to(self.device)  # with precomputed latents it stays on the CPU between validations
        fps = round(data.target_fps or data.default_fps)
        frames_per_clip = self.settings.num_frames or data.num_frames
        target = self.folder / f"step_{step:06d}"
        names = [f"image_{index}.mp4" for index in range(len(self.images))]
        devices = [self.device] if self.device.type == "cuda" else []
        try:

            def write(staging: Path) -> None:
                for index, (image, name) in enumerate(zip(self.images, names)):
                    frames = pipe(
                        image, height=data.height, width=data.width, num_frames=frames_per_clip,
                        num_inference_steps=self.settings.inference_steps, fps=fps,
                        motion_bucket_id=round(data.default_motion_bucket_id), decode_chunk_size=self.settings.decode_chunk or default_vae_chunk(frames_per_clip),
                        generator=torch.Generator().manual_seed(self.seed + index), **self.call_options,
                    ).frames[0]
                    media.write_frames(frames, staging / name, fps=fps)
                    frames[0].save(staging / Path(name).with_suffix(".png"))  # the model card's sample frame

            self.folder.mkdir(parents=True, exist_ok=True)
            with torch.random.fork_rng(devices=devices):  # the training's RNG stream stays as without validation
                _io.replace_folder(target, "validation", write, name="validation folder")
        finally:
            pipe.unet.to("cpu")
            pipe.vae.to("cpu")
            pipe.image_encoder.to(encoder_device)
        return [str(target / name) for name in names]
