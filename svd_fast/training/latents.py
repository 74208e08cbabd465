"""Precomputed clip features (``svd-fast encode``) and the dataset the trainer reads them from.

A latents folder holds ``settings.json`` (what was encoded: data, model, frames, size, frame sampling, layout),
``clips/clip_SSSSSSSS_NNNN.pt`` per clip (clip N of source S, the data's S-th file or manifest row: the VAE
posterior mean and std of every frame, the CLIP embedding of the clean first frame, the first frame's pixels,
fps and motion bucket; each written atomically), ``sources/source_SSSSSSSS.json`` once a source is done (its
clip files, or why it was skipped) and, last, ``complete.json``. Sources are independent jobs, encoded in one
process or by Ray Data actors (``svd-fast encode --ray``) into the same files. Encoding is resumable: a rerun
with the same settings redoes only the sources without a record or with a clip file missing.

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
CLIP_FILE = "clip_{source:08d}_{number:04d}.pt"
SOURCE_FILE = "source_{source:08d}.json"
LAYOUT = 2  # clips named by source (1: by position among the usable clips)


def _write_json(path: Path, value: dict) -> None:
    text = json.dumps(value, indent=2).encode()
    write_atomic(path, lambda file: file.write(text))


def clip_dataset(settings: dict[str, Any]):
    """The data of ``settings`` as encode reads it: every clip of every source, in order, no shuffling."""
    from svd_fast.data import VideoClipDataset  # noqa: PLC0415 - decoders load on demand

    return VideoClipDataset(settings["data"], num_frames=settings["num_frames"], size=(settings["height"], settings["width"]),
                            stride=settings["stride"], target_fps=settings["target_fps"], shuffle=False)


def prepare_latents_dir(out: Path, settings: dict[str, Any]) -> list[int]:
    """Create or reopen ``out`` for ``settings``; returns the sources still to encode. A folder written with
    other settings is refused (ValueError)."""
    settings = {**settings, "layout": LAYOUT}
    (out / "clips").mkdir(parents=True, exist_ok=True)
    (out / "sources").mkdir(exist_ok=True)
    settings_path = out / SETTINGS
    if settings_path.is_file():
        previous = json.loads(settings_path.read_text())
        if previous != settings:
            raise ValueError(f"--out {out} holds latents encoded with other settings ({previous}); choose another folder")
    else:
        _write_json(settings_path, settings)
    (out / COMPLETE).unlink(missing_ok=True)
    return [index for index in range(len(clip_dataset(settings).sources)) if not _source_done(out, index)]


def _source_done(out: Path, source: int) -> bool:
    record = out / "sources" / SOURCE_FILE.format(source=source)
    if not record.is_file():
        return False
    return all((out / "clips" / name).is_file() for name in json.loads(record.read_text())["clips"])


class ClipEncoder:
    """Encodes whole sources into a latents folder: called with ``{"source": S}``, writes every clip of source
    S and then its record; returns ``{"source", "path", "clips", "error"}``. Used as is in one process and as
    the Ray Data actor class."""

    def __init__(self, settings: dict[str, Any], out: str, device: str) -> None:
        from diffusers import StableVideoDiffusionPipeline  # noqa: PLC0415

        self.out = Path(out)
        self.device = torch.device(device)
        self.dataset = clip_dataset(settings)
        self.pipeline = StableVideoDiffusionPipeline.from_pretrained(settings["model"], dtype=torch.float32,
                                                                     variant=settings.get("model_variant"))
        self.pipeline.vae.to(self.device).eval()
        self.pipeline.image_encoder.to(self.device).eval()

    def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        index = int(job["source"])
        source = self.dataset.sources[index]
        errors_before = len(self.dataset.errors)
        names = []
        for number, sample in enumerate(self.dataset.source_clips(source)):
            name = CLIP_FILE.format(source=index, number=number)
            names.append(name)
            if (self.out / "clips" / name).is_file():
                continue
            pixels = sample["pixel_values"].unsqueeze(0).to(self.device)
            pipe = self.pipeline
            features = encode_clip_features(pixels, pipe.vae, pipe.image_encoder, pipe.feature_extractor)
            save_torch_atomic({
                "posterior_mean": features.posterior_mean[0].cpu(), "posterior_std": features.posterior_std[0].cpu(),
                "image_embeds": features.image_embeds[0].cpu(), "first_frame": features.first_frame[0].cpu(),
                "fps": sample.get("fps"), "motion_bucket_id": sample.get("motion_bucket_id"),
            }, self.out / "clips" / name)
        error = "; ".join(reason for _, reason in self.dataset.errors[errors_before:])
        _write_json(self.out / "sources" / SOURCE_FILE.format(source=index), {"path": source.path, "clips": names, "error": error})
        return {"source": index, "path": source.path, "clips": len(names), "error": error}


def finish_latents_dir(out: Path) -> tuple[int, list[tuple[str, str]]]:
    """Write ``complete.json`` once every source has its record; returns (clips, skipped (path, reason))."""
    settings = json.loads((out / SETTINGS).read_text())
    sources = len(clip_dataset(settings).sources)
    missing = [index for index in range(sources) if not _source_done(out, index)]
    if missing:
        raise ValueError(f"--out {out}: {len(missing)} source(s) not encoded (first: {missing[0]}); rerun to finish")
    records = [json.loads((out / "sources" / SOURCE_FILE.format(source=index)).read_text()) for index in range(sources)]
    clips = sum(len(record["clips"]) for record in records)
    if clips == 0:
        raise ValueError(f"data: no usable clips in {settings['data']!r}")
    _write_json(out / COMPLETE, {"clips": clips})
    return clips, [(record["path"], record["error"]) for record in records if record["error"]]


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
