"""CLIP embeddings of a clip's key frames, an aesthetics head over them, and caption similarity.

The model is a local folder in transformers' CLIPModel format (no downloads). Preprocessing is done in
torch (resize the short side, centre crop, CLIP normalisation) so no image processor files are required;
mean/std/size are read from preprocessor_config.json when the folder has one. Text similarity needs a
tokenizer in the same folder; without one it is skipped and recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_aesthetic_head(path: str | Path, embed_dim: int) -> torch.nn.Sequential:
    """A linear or MLP head from a torch state dict file: the 2-D weights, in key order, are Linear layers
    (ReLU between them); the last layer must output 1 value."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"aesthetic head {path}: expected a state dict, got {type(state).__name__}")
    weight_keys = [key for key, value in state.items() if key.endswith("weight") and value.ndim == 2]
    if not weight_keys:
        raise ValueError(f"aesthetic head {path}: no 2-D '*weight' tensors found")
    layers: list[torch.nn.Module] = []
    in_features = embed_dim
    for position, key in enumerate(weight_keys):
        weight = state[key]
        if weight.shape[1] != in_features:
            raise ValueError(f"aesthetic head {path}: {key} expects {weight.shape[1]} inputs, previous layer gives {in_features}")
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        bias = state.get(key[: -len("weight")] + "bias")
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
            else:
                linear.bias.zero_()
        layers.append(linear)
        if position < len(weight_keys) - 1:
            layers.append(torch.nn.ReLU())
        in_features = weight.shape[0]
    if in_features != 1:
        raise ValueError(f"aesthetic head {path}: last layer must output 1 value, got {in_features}")
    return torch.nn.Sequential(*layers).eval()


class ClipScorer:
    """Holds the CLIP model (and optional aesthetics head) once; scores many clips."""

    def __init__(self, model_path: str | Path, aesthetic_head_path: str | Path | None = None, device: torch.device | str | None = None):
        from transformers import CLIPModel  # noqa: PLC0415 - transformers loads only when a CLIP model is built

        model_path = Path(model_path)
        if not (model_path / "config.json").is_file():
            raise FileNotFoundError(f"clip model: {model_path} is not a transformers model folder (no config.json)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = CLIPModel.from_pretrained(str(model_path)).to(self.device).eval()
        self.image_size = int(self.model.config.vision_config.image_size)
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        processor_config = model_path / "preprocessor_config.json"
        if processor_config.is_file():
            config = json.loads(processor_config.read_text())
            self.mean = tuple(config.get("image_mean", self.mean))
            self.std = tuple(config.get("image_std", self.std))
        self.tokenizer = None
        self.tokenizer_missing_reason: str | None = None
        # Only a tokenizer saved in the folder is used: transformers would otherwise build an empty default one.
        if any((model_path / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer  # noqa: PLC0415 - transformers loads only when a CLIP model is built

            self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        else:
            self.tokenizer_missing_reason = f"no tokenizer in {model_path.name}"
        embed_dim = int(self.model.config.projection_dim)
        self.aesthetic_head = load_aesthetic_head(aesthetic_head_path, embed_dim).to(self.device) if aesthetic_head_path else None

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, S, S) normalised: short side resized to S, centre crop."""
        images = torch.as_tensor(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        height, width = images.shape[-2:]
        scale = self.image_size / min(height, width)
        new_height, new_width = max(self.image_size, round(height * scale)), max(self.image_size, round(width * scale))
        images = F.interpolate(images, size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=True)
        top, left = (new_height - self.image_size) // 2, (new_width - self.image_size) // 2
        images = images[..., top : top + self.image_size, left : left + self.image_size]
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return (images - mean) / std

    @torch.no_grad()
    def image_embeddings(self, frames: np.ndarray) -> torch.Tensor:
        """L2-normalised CLIP image embeddings (N, D)."""
        output = self.model.get_image_features(pixel_values=self.preprocess(frames))
        features = output if isinstance(output, torch.Tensor) else output.pooler_output
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def score(self, frames: np.ndarray, caption: str | None = None) -> dict[str, object]:
        """Mean embedding of ``frames`` (the clip's first/middle/last), aesthetic score, caption similarity."""
        embeddings = self.image_embeddings(frames)
        clip_embedding = F.normalize(embeddings.mean(0), dim=-1)
        result: dict[str, object] = {"clip_embedding": clip_embedding.cpu().tolist(), "aesthetic_score": None, "clip_text_similarity": None}
        if self.aesthetic_head is not None:
            # Scored per frame, then averaged: the head was trained on single-image embeddings.
            result["aesthetic_score"] = float(self.aesthetic_head(embeddings).mean())
        if caption and self.tokenizer is not None:
            tokens = self.tokenizer([caption], padding=True, truncation=True, return_tensors="pt").to(self.device)
            output = self.model.get_text_features(**tokens)
            text = F.normalize((output if isinstance(output, torch.Tensor) else output.pooler_output).float(), dim=-1)
            result["clip_text_similarity"] = float((embeddings @ text[0]).mean())
        return result
