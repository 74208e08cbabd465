"""What loading an SVD pipeline needs before and besides the load itself (which is
:func:`svd_fast.diffusers.generation.load_optimized_pipeline`): the model-folder check and SVD's CLIP image
processor."""

from __future__ import annotations

from pathlib import Path

PIPELINE_COMPONENTS = ("unet", "vae", "image_encoder", "scheduler", "feature_extractor")


class ModelFolderError(ValueError):
    """The --model path is not a usable diffusers-format SVD folder."""


def clip_image_processor():
    """The CLIP image processor SVD ships, in the class that works without torchvision."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class  # noqa: PLC0415 - transformers >= 5
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class  # noqa: PLC0415 - transformers < 5
    return processor_class(
        crop_size={"height": 224, "width": 224},
        size={"shortest_edge": 224},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def check_model_folder(path: Path) -> None:
    """Raise ModelFolderError naming what is missing from a diffusers-format SVD folder."""
    if not path.exists():
        raise ModelFolderError(f"--model: {path} does not exist")
    if not path.is_dir():
        raise ModelFolderError(f"--model: {path} is not a folder")
    if not (path / "model_index.json").is_file():
        raise ModelFolderError(
            f"--model: {path} has no model_index.json; expected a diffusers-format folder such as "
            "stabilityai/stable-video-diffusion-img2vid-xt (see `svd-fast make-tiny` for an example)"
        )
    missing = [name for name in PIPELINE_COMPONENTS if not (path / name).is_dir()]
    if missing:
        raise ModelFolderError(f"--model: {path} lacks the component folder(s) {missing}")


def check_variant(path: Path, variant: str) -> None:
    """Raise ModelFolderError when the folder holds no ``*.{variant}.safetensors`` / ``.bin`` weights, so a mistyped
    or absent variant is named before diffusers' loader fails on it."""
    if not variant or not all(part.isalnum() or part in "-_" for part in variant):
        raise ModelFolderError(f"--variant: {variant!r} is not a weights variant name (e.g. fp16)")
    if not any(path.glob(f"*/*.{variant}.safetensors")) and not any(path.glob(f"*/*.{variant}.bin")):
        raise ModelFolderError(f"--variant {variant}: {path} holds no *.{variant}.safetensors weights "
                               "(omit --variant, or download that variant)")
