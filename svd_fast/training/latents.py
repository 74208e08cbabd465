"""Precomputed clip features (``svd-fast encode``) and the dataset the trainer reads them from.

A latents folder holds ``settings.json`` (what was encoded: data, model and the identity of its VAE and image
encoder weights, frames, size, frame sampling, layout), ``clips/clip_KKKKKKKKKKKKKKKK_NNNN.pt`` per clip (clip N of
the source with key K: the VAE posterior mean and std of every frame, the CLIP embedding of the clean first
frame, the first frame's pixels, fps and motion bucket; each written atomically), ``sources/source_K.json``
once a source is done (its clip files with their sizes, or why it was skipped) and, last, ``complete.json``
(every clip file with its size). A source's key is its identity (path, size, modification time, frame range),
not its position, so adding, removing or changing a video redoes exactly the sources that changed. Sources are
independent jobs, encoded in one process or by Ray Data actors (``svd-fast encode --ray``) into the same files.
Encoding is resumable: a rerun with the same settings redoes only the sources without a record or with a clip
file missing or of another size (truncated), and removes the files of sources no longer in the data.

What stays in the training loop: the conditioning frame is noise-augmented in pixel space and then VAE-encoded,
as SVD trains it, so one VAE encode of one frame per sample remains; target latents are still sampled from the
stored posterior with the step's generator, so training from precomputed features gives the same batches as
encoding on the fly with the same seed. Deviation: a clip's crop is fixed when it is encoded (random_crop picks
one crop per clip, not one per epoch).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from svd_fast import _io
from svd_fast.training.checkpoint import save_torch_atomic
from svd_fast.training.objective import ClipFeatures, encode_clip_features

SETTINGS = "settings.json"
COMPLETE = "complete.json"
CLIP_FILE = "clip_{key}_{number:04d}.pt"
SOURCE_FILE = "source_{key}.json"
LAYOUT = 3  # clips named by source identity (2: by source position, 1: by position among the usable clips)
MODEL_PARTS = ("vae", "image_encoder")
EDGE_BYTES = 1 << 20


def source_key(source) -> str:
    """The identity of a data source (a ClipSource): path, size, modification time, frame range and columns."""
    path = Path(source.path).resolve()
    try:
        stat = path.stat()
        found = [stat.st_size, stat.st_mtime_ns]
    except OSError as error:
        found = [f"unreadable {error.errno}"]
    identity = [str(path), *found, source.start_frame, source.end_frame, [list(item) for item in source.extra]]
    return hashlib.sha1(json.dumps(identity, default=str).encode()).hexdigest()[:16]


def model_identity(model: str | Path) -> str:
    """What the latents depend on in a pipeline folder: the VAE's and image encoder's files (names, sizes and
    the hash of their first and last MiB), so a copy of the same model matches and other weights do not."""
    digest = hashlib.sha256()
    for part in MODEL_PARTS:
        for path in sorted((Path(model) / part).rglob("*")):
            if not path.is_file() or path.name == _io.MARKER:
                continue
            size = path.stat().st_size
            digest.update(f"{path.relative_to(model)}|{size}|".encode())
            with path.open("rb") as file:
                digest.update(file.read(EDGE_BYTES))
                if size > 2 * EDGE_BYTES:
                    file.seek(size - EDGE_BYTES)
                    digest.update(file.read())
    return digest.hexdigest()[:16]


def _write_json(path: Path, value: dict) -> None:
    _io.write_json(path, value, fsync=True)


def clip_dataset(settings: dict[str, Any]):
    """The data of ``settings`` as encode reads it: every clip of every source, in order, no shuffling."""
    from svd_fast.data import VideoClipDataset  # noqa: PLC0415 - decoders load on demand

    return VideoClipDataset(settings["data"], num_frames=settings["num_frames"], size=(settings["height"], settings["width"]),
                            stride=settings["stride"], target_fps=settings["target_fps"], shuffle=False)


def prepare_latents_dir(out: Path, settings: dict[str, Any]) -> list[int]:
    """Create or reopen ``out`` for ``settings``; returns the sources still to encode. A folder written with
    other settings is refused (ValueError)."""
    settings = {**settings, "layout": LAYOUT, "model_identity": model_identity(settings["model"])}
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
    sources = clip_dataset(settings).sources
    return [index for index, source in enumerate(sources) if not _source_done(out, source_key(source))]


def _record(out: Path, key: str) -> dict[str, Any] | None:
    try:
        record = json.loads((out / "sources" / SOURCE_FILE.format(key=key)).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("clips"), dict) else None


def _source_done(out: Path, key: str) -> bool:
    """The source's record exists and every clip file it lists has the size written (a truncated one does not)."""
    record = _record(out, key)
    if record is None:
        return False
    for name, size in record["clips"].items():
        path = out / "clips" / name
        if not path.is_file() or path.stat().st_size != size:
            path.unlink(missing_ok=True)
            return False
    return True


class ClipEncoder:
    """Encodes whole sources into a latents folder: called with ``{"source": S}``, writes every clip of source
    S and then its record; returns ``{"source", "path", "clips", "error"}``. Used as is in one process and as
    the Ray Data actor class."""

    def __init__(self, settings: dict[str, Any], out: str, device: str) -> None:
        from diffusers import StableVideoDiffusionPipeline  # noqa: PLC0415 - diffusers loads only when a model is built

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
        key = source_key(source)
        errors_before = len(self.dataset.errors)
        names = []
        for number, sample in enumerate(self.dataset.source_clips(source)):
            name = CLIP_FILE.format(key=key, number=number)
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
        clips = {name: (self.out / "clips" / name).stat().st_size for name in names}
        _write_json(self.out / "sources" / SOURCE_FILE.format(key=key), {"path": source.path, "clips": clips, "error": error})
        return {"source": index, "path": source.path, "clips": len(names), "error": error}


def finish_latents_dir(out: Path) -> tuple[int, list[tuple[str, str]]]:
    """Write ``complete.json`` once every source has its record; returns (clips, skipped (path, reason))."""
    settings = json.loads((out / SETTINGS).read_text())
    sources = clip_dataset(settings).sources
    keys = [source_key(source) for source in sources]
    missing = [source.path for source, key in zip(sources, keys) if not _source_done(out, key)]
    if missing:
        raise ValueError(f"--out {out}: {len(missing)} source(s) not encoded (first: {missing[0]}); rerun to finish")
    records = [_record(out, key) for key in keys]
    files = {name: size for record in records for name, size in record["clips"].items()}
    if not files:
        raise ValueError(f"data: no usable clips in {settings['data']!r}")
    # Sources no longer in the data (removed or changed files): their clips must not be trained on.
    wanted = set(files) | {SOURCE_FILE.format(key=key) for key in keys}
    for stale in [*(out / "clips").glob("clip_*.pt"), *(out / "sources").glob("source_*.json")]:
        if stale.name not in wanted:
            stale.unlink()
    _write_json(out / COMPLETE, {"clips": len(files), "files": files})
    return len(files), [(record["path"], record["error"]) for record in records if record["error"]]


def check_latents_dir(folder: Path, expected: dict[str, Any]) -> int:
    """The number of clips in a complete latents folder encoded with ``expected`` (frames and size)."""
    if not (folder / COMPLETE).is_file():
        raise ValueError(f"latents_dir: {str(folder)!r} is not a complete `svd-fast encode` output (rerun svd-fast encode to finish it)")
    settings = json.loads((folder / SETTINGS).read_text())
    if settings.get("layout") != LAYOUT:
        raise ValueError(f"latents_dir: {str(folder)!r} was written by an older svd-fast encode (layout {settings.get('layout')}); encode again into a new folder")
    for key, value in expected.items():
        if key == "model_identity" and settings.get(key) != value:
            raise ValueError(f"latents_dir: encoded with the VAE and image encoder of {settings.get('model')!r}, "
                             "the config's model has other weights (encode again with this model)")
        if settings.get(key) != value:
            raise ValueError(f"latents_dir: encoded with {key}={settings.get(key)!r}, the config has {value!r}")
    files = json.loads((folder / COMPLETE).read_text())["files"]
    for name, size in files.items():
        path = folder / "clips" / name
        if not path.is_file() or path.stat().st_size != size:
            raise ValueError(f"latents_dir: {path} is missing or truncated (rerun svd-fast encode on {folder} to redo it)")
    return len(files)


class PrecomputedClips:
    """Clip features from a latents folder, the ClipStream interface of VideoClipDataset: per-epoch shuffle
    by (seed, epoch), clips split across ranks."""

    def __init__(self, folder: str | Path, shuffle: bool, seed: int, rank: int, world_size: int) -> None:
        self.folder = Path(folder)
        self.files = [self.folder / "clips" / name for name in json.loads((self.folder / COMPLETE).read_text())["files"]]  # data order
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
