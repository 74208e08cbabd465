"""`svd-fast generate --input DIR_OR_LIST --out DIR`: one video per image, resumable, optionally over Ray.

* Inputs: a folder's images (not recursive, sorted by name) or a text file with one image path a line
  (relative paths are relative to the list file; blank lines and ``#`` comments are skipped).
* Each image gets ``DIR/<stem>.<format>`` and its own seed, derived from ``--seed`` and its file name
  (stable when images are added or the batch is split). Outputs are written atomically (svd_fast.media).
* ``DIR/index.parquet`` has one row per image: its seed, the generation parameters, ``started_at`` (Unix time),
  ``status`` ("ok" or "error"), the error message and the seconds it took. It is rewritten atomically after every image.
* Resume: an image whose output exists is skipped (outputs only ever appear whole); failed images are
  retried; temporary files of a killed run are removed at the start.
* A readable batch with some unreadable images generates the others, records each error and exits 1.
* ``--ray local`` starts a local Ray cluster, ``--ray auto`` joins the running one; Ray Data spreads the
  images over ``--actors`` actors, each holding one pipeline (one GPU each where the cluster has GPUs).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from svd_fast import media
from svd_fast.commands import generate
from svd_fast.commands.errors import EXIT_PARTIAL, UsageError, require_positive, require_writable_dir
from svd_fast.commands.generate import GenerateOptions, check_options, sample_video
from svd_fast.commands.ray_actors import rows_from_actors

INDEX_NAME = "index.parquet"
OUTPUT_FORMATS = ("mp4", "gif", "frames")


def list_images(source: str | Path) -> list[Path]:
    """The images of a folder or a list file (absolute paths); UsageError when there are none."""
    source = Path(source)
    if source.is_dir():
        images = sorted(p.resolve() for p in source.iterdir() if p.is_file() and p.suffix.lower() in media.IMAGE_SUFFIXES)
    elif source.is_file():
        try:
            lines = source.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"--input {source} is not a readable list of image paths ({error})") from None
        entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        images = [(source.parent / entry).resolve() for entry in entries]
    else:
        raise UsageError(f"--input {source} does not exist", "pass a folder of images or a text file listing them")
    if not images:
        raise UsageError(f"--input {source} holds no images ({', '.join(media.IMAGE_SUFFIXES)})")
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
        self.pipe = generate.load_optimized_pipeline(options)

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
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    path = out_dir / INDEX_NAME
    if not path.exists():
        return {}
    try:
        return {row["image"]: row for row in pq.read_table(path).to_pylist()}
    except (OSError, pa.ArrowException, KeyError):
        return {}


def write_index(out_dir: Path, rows: Iterable[dict[str, Any]]) -> None:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

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


def run_batch(
    source: str | Path,
    out_dir: str | Path,
    options: GenerateOptions,
    output_format: str = "mp4",
    ray: str | None = None,
    actors: int | None = None,
) -> int:
    """Generate every missing video of the batch; 0 when all are done, EXIT_PARTIAL when some failed."""
    if output_format not in OUTPUT_FORMATS:
        raise UsageError(f"--format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    if ray not in (None, "auto", "local"):
        raise UsageError(f"--ray must be auto or local, got {ray!r}")
    require_positive("--actors", actors, integer=True)
    images = list_images(source)
    options = check_options(options)
    out_dir = require_writable_dir("--out", out_dir)
    stems = [image.stem for image in images]
    if len(set(stems)) != len(stems):
        raise UsageError("--input has several images with the same name stem; their outputs would collide")
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
        print(f"{row['status']}: {row['output']}" + (f" ({row['error']})" if row["error"] else ""), file=sys.stderr)

    if jobs:
        (_run_ray if ray else _run_local)(jobs, options, on_done, ray, actors)
    else:
        write_index(out_dir, rows.values())
    failed = [row for row in rows.values() if row["status"] != "ok"]
    print(f"{len(rows) - len(failed)} of {len(rows)} videos in {out_dir} ({len(images) - len(jobs)} already there); {len(failed)} failed")
    return EXIT_PARTIAL if failed else 0


def _run_local(jobs: list[dict], options: GenerateOptions, on_done: Callable[[dict], None], _ray: None, _actors: int | None) -> None:
    worker = VideoWorker(options)
    for job in jobs:
        on_done(worker(job))


def _run_ray(jobs: list[dict], options: GenerateOptions, on_done: Callable[[dict], None], address: str, actors: int | None) -> None:
    def actor_options(cluster_has_gpus: bool) -> dict:
        return {"options": dataclasses.replace(options, progress=False, device="cuda" if cluster_has_gpus else options.device)}

    for row in rows_from_actors(jobs, VideoWorker, actor_options, address, actors):  # the index is rewritten as each video arrives
        on_done(row)
