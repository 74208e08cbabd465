"""The model card (``README.md``, Hugging Face's format: YAML front matter, then Markdown) written beside every
export of ``svd-fast train``: the base model, a licence note for its weights, the training config, the data's hash
and, when validation ran, a sample frame of the latest validation clip (``sample.png`` beside the card)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from svd_fast.training.validation import VALIDATION_DIR

SAMPLE_FILE = "sample.png"
LICENCE_NOTE = (
    "The base model's weights are Stability AI's and come with their own licence (for SVD and SVD-XT, Stability AI's "
    "licence published with the weights; read the base model's own model card and licence file). These weights are a "
    "derivative of them: their use is subject to that licence, whatever the licence of svd-fast's code."
)


def data_hash(config) -> str:
    """SHA-256 of what the run trained on: the manifest file (``data.path`` a .parquet/.jsonl), the precomputed
    latents' JSON files, or the names and sizes of the video files (``data.path`` a folder or a list)."""
    digest = hashlib.sha256()
    data = config.data
    if data.latents_dir is not None:
        paths = sorted(path for path in Path(data.latents_dir).rglob("*") if path.is_file() and path.suffix == ".json")
    elif isinstance(data.path, str) and Path(data.path).is_file():
        paths = [Path(data.path)]
    else:
        folders = [Path(source) for source in data.sources()]
        files = sorted(path for folder in folders for path in ([folder] if folder.is_file() else folder.rglob("*")) if path.is_file())
        for path in files:
            digest.update(f"{path.name}\0{path.stat().st_size}\n".encode())
        return digest.hexdigest()
    for path in paths:
        with path.open("rb") as file:
            digest.update(hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()


def latest_sample(output_dir: Path) -> Path | None:
    """The first frame of the first clip of the latest validation (None when validation never ran)."""
    steps = sorted((output_dir / VALIDATION_DIR).glob("step_*")) if (output_dir / VALIDATION_DIR).is_dir() else []
    frames = sorted(steps[-1].glob("image_*.png")) if steps else []
    return frames[0] if frames else None


def model_card(config, config_dict: dict[str, Any], kind: str, sample: Path | None) -> str:
    """The card of an export: ``kind`` is ``pipeline`` (a diffusers pipeline folder) or ``lora`` (the adapter)."""
    library = "peft" if kind == "lora" else "diffusers"
    what = (f"A LoRA adapter (rank {config.lora.rank}, layers: {config.lora.layers}) for the UNet of the base model, in peft's "
            "layout (`adapter_config.json` + `adapter_model.safetensors`) and diffusers' (`pytorch_lora_weights.safetensors`)"
            if kind == "lora" else f"The base model's pipeline with the UNet fine-tuned ({config.trained_parameters})")
    lines = [
        "---", f"base_model: {json.dumps(config.model)}", f"library_name: {library}", "pipeline_tag: image-to-video", "license: other",
        "tags: [stable-video-diffusion, svd-fast]", "---", "", "# Stable Video Diffusion fine-tune (svd-fast)", "",
        f"{what}, trained with `svd-fast train` for {config.max_steps} steps.", "",
        "## Base model", "", f"`{config.model}`" + (f" (variant {config.model_variant})" if config.model_variant else ""), "",
        "## Licence", "", LICENCE_NOTE, "",
        "## Data", "", f"SHA-256 of the training data (manifest, latents index or video files): `{data_hash(config)}`", "",
    ]
    if kind == "lora":
        lines += ["## Use", "", "```python", "import svd_fast", "svd_fast.load_lora(pipe, 'PATH/TO/THIS/FOLDER')",
                  "# or peft: PeftModel.from_pretrained(pipe.unet, 'PATH/TO/THIS/FOLDER')", "```", ""]
    if sample is not None:
        lines += ["## Sample", "", f"First frame of the latest validation clip ({sample.parent.name}):", "", f"![sample]({SAMPLE_FILE})", ""]
    lines += ["## Training config", "", "```json", json.dumps(config_dict, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)


def card_files(config, config_dict: dict[str, Any], kind: str) -> dict[str, bytes]:
    """``README.md`` (and ``sample.png`` when validation produced one): file name -> content. Reads the data's
    files for their hash: call it on one rank."""
    sample = latest_sample(Path(config.output_dir))
    files = {"README.md": model_card(config, config_dict, kind, sample).encode()}
    if sample is not None:
        files[SAMPLE_FILE] = sample.read_bytes()
    return files
