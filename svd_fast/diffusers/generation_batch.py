"""Batch generation (``svd-fast generate --input DIR_OR_LIST --out DIR``): one video per image, resumable,
optionally over Ray.

* Inputs: a folder's images (not recursive, sorted by name) or a text file with one image path a line
  (relative paths are relative to the list file; blank lines and ``#`` comments are skipped).
* Each image gets ``DIR/<stem>.<format>`` and its own seed, derived from ``--seed`` and its file name
  (stable when images are added or the batch is split). Outputs are written atomically (svd_fast.media).
* ``DIR/index.parquet`` has one row per image: its seed, the generation parameters, ``started_at`` (Unix time),
  ``status`` ("ok" or "error"), the error message and the seconds it took. It is rewritten atomically after every image.
* Resume: an image whose output exists is skipped (outputs only ever appear whole); failed images are
  retried; temporary files of a killed run are removed at the start.
* A readable batch with some unreadable images generates the others, records each error and exits 1.
* ``ray="local"`` starts a local Ray cluster, ``ray="auto"`` joins the running one (:mod:`svd_fast._ray`); Ray
  Data spreads the images over ``actors`` actors, each holding one pipeline (one GPU each where the cluster has GPUs).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from svd_fast import media
from svd_fast._ray import rows_from_actors
from svd_fast.diffusers import generation
from svd_fast.diffusers.generation import GenerateOptions, check_options, sample_video
from svd_fast.diffusers.settings import OptionError, require_positive

INDEX_NAME = "index.parquet"
OUTPUT_FORMATS = ("mp4", "gif", "frames")


def list_images(source: str | Path) -> list[Path]:
    """The images of a folder or a list file (absolute paths); OptionError naming ``input`` when there are none."""
    source = Path(source)
    if source.is_dir():
        images = sorted(p.resolve() for p in source.iterdir() if p.is_file() and p.suffix.lower() in media.IMAGE_SUFFIXES)
    elif source.is_file():
        try:
            lines = source.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise OptionError("{input} {path} is not a readable list of image paths ({error})", path=source, error=error) from None
        entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        images = [(source.parent / entry).resolve() for entry in entries]
    else:
        raise OptionError("{input} {path} does not exist", "pass a folder of images or a text file listing them", path=source)
    if not images:
        raise OptionError("{input} {path} holds no images ({suffixes})", path=source, suffixes=", ".join(media.IMAGE_SUFFIXES))
    return images


def image_seed(seed: int, image: Path) -> int:
    """The seed of one image: ``seed`` mixed with the image's file name."""
    return (seed + zlib.crc32(image.name.encode())) % 2**31


def output_path(out_dir: Path, image: Path, output_format: str) -> Path:
    return out_dir / (image.stem if output_format == "frames" else f"{image.stem}.{output_format}")


class VideoWorker:
    """One pipeline; called with a job row, it writes that image's video and returns the row with its
    status. Used as is in one process and as the Ray Data actor class."""

    def __init__(self, options: GenerateOptions) -> None:
        self.options = options
        self.pipe = generation.pipeline_for(options)

    def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        row = dict(job, started_at=time.time())
        try:
            condition = media.load_image(job["image"], max_size=(self.options.width, self.options.height))
            frames = sample_video(self.pipe, condition, self.options, job["seed"])
            media.write_frames(frames, job["output"], fps=self.options.fps)
            row.update(status="ok", error="")
        except (media.MediaError, OSError) as error:
            row.update(status="error", error=str(error))
        row["seconds"] = round(time.perf_counter() - started, 3)
        return row


def _parameters(options: GenerateOptions) -> dict[str, Any]:
    names = ("model", "frames", "steps", "height", "width", "fps", "motion_bucket_id", "noise_aug_strength",
             "min_guidance", "max_guidance", "sampler", "cache_interval", "dtype", "device", "optimize")  # fmt: skip
    return {name: getattr(options, name) for name in names}


def read_index(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Rows of an existing index by image; {} when there is none or it cannot be read (it is rewritten)."""
    import pyarrow as pa  # noqa: PLC0415 - optional dependency (the data extra)
    import pyarrow.parquet as pq  # noqa: PLC0415 - optional dependency (the data extra)

    path = out_dir / INDEX_NAME
    if not path.exists():
        return {}
    try:
        return {row["image"]: row for row in pq.read_table(path).to_pylist()}
    except (OSError, pa.ArrowException, KeyError):
        return {}


def write_index(out_dir: Path, rows: Iterable[dict[str, Any]]) -> None:
    import pyarrow as pa  # noqa: PLC0415 - optional dependency (the data extra)
    import pyarrow.parquet as pq  # noqa: PLC0415 - optional dependency (the data extra)

    rows = sorted(rows, key=lambda row: row["image"])
    names = list(dict.fromkeys(name for row in rows for name in row))  # rows of an older index may lack a column
    table = pa.Table.from_pylist([{name: row.get(name) for name in names} for row in rows])
    descriptor, temporary = tempfile.mkstemp(dir=out_dir, prefix=f"{media.PARTIAL_PREFIX}index-", suffix=".parquet")
    os.close(descriptor)
    try:
        pq.write_table(table, temporary)
        os.replace(temporary, out_dir / INDEX_NAME)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def generate_batch(
    source: str | Path,
    out_dir: str | Path,
    options: GenerateOptions,
    output_format: str = "mp4",
    ray: str | None = None,
    actors: int | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Generate every missing video of the batch (``on_row`` gets each image's index row as it is written);
    returns ``{"out", "videos", "already_there", "failed"}`` (the failed rows). Everything is checked before
    the model loads (OptionError / ModelFolderError, ValueErrors naming the argument)."""
    if output_format not in OUTPUT_FORMATS:
        raise OptionError("{format} must be one of {choices}, got {got!r}", choices=OUTPUT_FORMATS, got=output_format)
    if ray is not None and not isinstance(ray, str):
        raise OptionError("{ray} must be a Ray address ('local', 'auto', ...) or None, got {got!r}", got=ray)
    require_positive("actors", actors, integer=True)
    images = list_images(source)
    options = check_options(options)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = [image.stem for image in images]
    if len(set(stems)) != len(stems):
        raise OptionError("{input} has several images with the same name stem; their outputs would collide")
    media.remove_partials(out_dir)

    rows = read_index(out_dir)
    parameters = _parameters(options)
    jobs = []
    for image in images:
        output = output_path(out_dir, image, output_format)
        if output.exists():
            rows.setdefault(str(image), {"image": str(image), "output": str(output), "seed": image_seed(options.seed, image),
                                         **parameters, "started_at": None, "status": "ok", "error": "", "seconds": 0.0})  # fmt: skip
            continue
        jobs.append({"image": str(image), "output": str(output), "seed": image_seed(options.seed, image), **parameters})

    def on_done(row: dict[str, Any]) -> None:
        rows[row["image"]] = row
        write_index(out_dir, rows.values())
        if on_row is not None:
            on_row(row)

    if jobs:
        (_run_ray if ray else _run_local)(jobs, options, on_done, ray, actors)
    else:
        write_index(out_dir, rows.values())
    failed = [row for row in rows.values() if row["status"] != "ok"]
    return {"out": str(out_dir), "videos": len(rows), "already_there": len(images) - len(jobs), "failed": failed}


def _run_local(jobs: list[dict], options: GenerateOptions, on_done: Callable[[dict], None], _ray: None, _actors: int | None) -> None:
    worker = VideoWorker(options)
    for job in jobs:
        on_done(worker(job))


def _run_ray(jobs: list[dict], options: GenerateOptions, on_done: Callable[[dict], None], address: str, actors: int | None) -> None:
    def actor_options(cluster_has_gpus: bool) -> dict:
        return {"options": dataclasses.replace(options, progress=False, device="cuda" if cluster_has_gpus else options.device)}

    for row in rows_from_actors(jobs, VideoWorker, actor_options, address, actors):  # the index is rewritten as each video arrives
        on_done(row)
