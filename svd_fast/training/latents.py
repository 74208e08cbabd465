"""Precomputed clip features (``svd-fast encode``) and the dataset the trainer reads them from.

A latents folder holds ``settings.json`` (what was encoded: data, model, frames, size, frame sampling),
``clips/clip_NNNNNNNN.pt`` per clip (the VAE posterior mean and std of every frame, the CLIP embedding of the
clean first frame, the first frame's pixels, fps and motion bucket; each written atomically) and, last,
``complete.json``. Encoding is resumable: a rerun with the same settings keeps the clips already written.

What stays in the training loop: the conditioning frame is noise-augmented in pixel space and then VAE-encoded,
as SVD trains it, so one VAE encode of one frame per sample remains; target latents are still sampled from the
stored posterior with the step's generator, so training from precomputed features gives the same batches as
encoding on the fly with the same seed. Deviation: a clip's crop is fixed when it is encoded (random_crop picks
one crop per clip, not one per epoch).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from svd_fast.training.checkpoint import save_torch_atomic, write_atomic
from svd_fast.training.objective import ClipFeatures, encode_clip_features

SETTINGS = "settings.json"
COMPLETE = "complete.json"
CLIP_FILE = "clip_{index:08d}.pt"


def _write_json(path: Path, value: dict) -> None:
    text = json.dumps(value, indent=2).encode()
    write_atomic(path, lambda file: file.write(text))


def encode_clips(dataset, pipeline, out: Path, settings: dict[str, Any], device: torch.device) -> int:
    """Encode every clip of ``dataset`` (one epoch, in order) into ``out``; returns the number of clips.
    Clips already in ``out`` from an earlier run with the same ``settings`` are kept."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "clips").mkdir(exist_ok=True)
    settings_path = out / SETTINGS
    if settings_path.is_file():
        previous = json.loads(settings_path.read_text())
        if previous != settings:
            raise ValueError(f"--out {out} holds latents encoded with other settings ({previous}); choose another folder")
    else:
        _write_json(settings_path, settings)
    (out / COMPLETE).unlink(missing_ok=True)
    count = 0
    for index, sample in enumerate(dataset):
        path = out / "clips" / CLIP_FILE.format(index=index)
        count = index + 1
        if path.is_file():
            continue
        pixels = sample["pixel_values"].unsqueeze(0).to(device)
        features = encode_clip_features(pixels, pipeline.vae, pipeline.image_encoder, pipeline.feature_extractor)
        save_torch_atomic({
            "posterior_mean": features.posterior_mean[0].cpu(), "posterior_std": features.posterior_std[0].cpu(),
            "image_embeds": features.image_embeds[0].cpu(), "first_frame": features.first_frame[0].cpu(),
            "fps": sample.get("fps"), "motion_bucket_id": sample.get("motion_bucket_id"),
        }, path)
    if count == 0:
        raise ValueError(f"data: no usable clips in {settings['data']!r}")
    _write_json(out / COMPLETE, {"clips": count})
    return count


def check_latents_dir(folder: Path, expected: dict[str, Any]) -> int:
    """The number of clips in a complete latents folder encoded with ``expected`` (frames and size)."""
    if not (folder / COMPLETE).is_file():
        raise ValueError(f"latents_dir: {str(folder)!r} is not a complete `svd-fast encode` output (rerun svd-fast encode to finish it)")
    settings = json.loads((folder / SETTINGS).read_text())
    for key, value in expected.items():
        if settings.get(key) != value:
            raise ValueError(f"latents_dir: encoded with {key}={settings.get(key)!r}, the config has {value!r}")
    return int(json.loads((folder / COMPLETE).read_text())["clips"])


class PrecomputedClips:
    """Clip features from a latents folder, the ClipStream interface of VideoClipDataset: per-epoch shuffle
    by (seed, epoch), clips split across ranks."""

    def __init__(self, folder: str | Path, shuffle: bool, seed: int, rank: int, world_size: int) -> None:
        self.folder = Path(folder)
        self.files = sorted((self.folder / "clips").glob("clip_*.pt"))
        self.sources = [str(self.folder)]
        self.errors: list[tuple[str, str]] = []
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = list(self.files)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        for path in order[self.rank :: self.world_size]:
            yield torch.load(path, map_location="cpu", weights_only=True)


def stack_features(samples: list[dict[str, Any]], device: torch.device) -> ClipFeatures:
    def stacked(key: str) -> torch.Tensor:
        return torch.stack([sample[key] for sample in samples]).to(device)

    return ClipFeatures(posterior_mean=stacked("posterior_mean"), posterior_std=stacked("posterior_std"),
                        image_embeds=stacked("image_embeds"), first_frame=stacked("first_frame"))
