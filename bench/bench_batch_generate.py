"""Batch generation over Ray actors (CPU, tiny model): N images on 1 actor vs 2 actors, one thread each.

Runs `svd-fast generate --input IMAGES --out DIR --format frames --ray local --actors K` for K = 1 and K = 2 on
the same images, model, steps and seeds, each in a fresh process with OMP_NUM_THREADS=1 (Ray keeps a value that is
already set, so every actor's torch runs one thread). Reports the wall time of each command (Ray start, model
loads and all videos), its generation time (from the start of the first video to the end of the last, i.e.
without the fixed start-up), the per-image seconds from index.parquet, the ratios 2 actors / 1 actor (target:
<= 0.6) and the largest difference between the two runs' frames of each image (its seed derives from --seed and
the file name, so the outputs must agree; tolerance: two 8-bit levels, as in tests/test_generate_cli.py).

Run: PYTHONPATH=. python bench/bench_batch_generate.py [--images 8] [--steps 10] [--frames 8] [--work DIR]
Prints one JSON object. The machine's load average is recorded before and after: on a shared machine the ratio
is only meaningful when the load stays below the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

TOLERANCE = 2  # 8-bit levels, as tests/test_generate_cli.py allows between a local and a Ray batch


def _images(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"image_{index:02d}.png"
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _run(model: Path, images: Path, out: Path, actors: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, "-m", "svd_fast.cli", "generate", "--model", str(model), "--input", str(images),
        "--out", str(out), "--format", "frames", "--ray", "local", "--actors", str(actors), "--device", "cpu",
        "--steps", str(args.steps), "--frames", str(args.frames), "--height", str(args.size), "--width", str(args.size),
        "--seed", "0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"generate with {actors} actor(s) exited {completed.returncode}:\n{completed.stderr[-4000:]}")
    import pyarrow.parquet as pq  # noqa: PLC0415

    rows = pq.read_table(out / "index.parquet").to_pylist()
    if len(rows) != args.images or any(row["status"] != "ok" for row in rows):
        raise RuntimeError(f"generate with {actors} actor(s) did not make every video: {rows}")
    # Generation: from the start of the first video to the end of the last (index.parquet's started_at and
    # seconds); the Ray start and the model loads before it are the same fixed cost for 1 and 2 actors.
    generation = max(row["started_at"] + row["seconds"] for row in rows) - min(row["started_at"] for row in rows)
    return {
        "wall_s": round(seconds, 2),
        "generation_s": round(generation, 2),
        "image_s_mean": round(float(np.mean([row["seconds"] for row in rows])), 3),
        "image_s_sum": round(float(np.sum([row["seconds"] for row in rows])), 2),
        "seeds": {Path(row["image"]).stem: row["seed"] for row in rows},
    }


def _frames(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path), dtype=np.int16) for path in sorted(folder.glob("*.png"))])


def _max_difference(out_one: Path, out_two: Path, stems: list[str]) -> dict[str, int]:
    differences = {}
    for stem in stems:
        one, two = _frames(out_one / stem), _frames(out_two / stem)
        if one.shape != two.shape or one.size == 0:
            raise RuntimeError(f"{stem}: frames differ in shape or are missing ({one.shape} vs {two.shape})")
        differences[stem] = int(np.abs(one - two).max())
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (the tiny model's is 64)")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_batch_generate-") as temporary:
        work = args.work or Path(temporary)
        model = work / "tiny"
        if not (model / "model_index.json").exists():
            subprocess.run([sys.executable, "-m", "svd_fast.cli", "make-tiny", str(model)], check=True, capture_output=True)
        images = work / "images"
        stems = [path.stem for path in _images(images, args.images, args.size)]
        report = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count(), "images": args.images,
                  "steps": args.steps, "frames": args.frames, "size": args.size}  # fmt: skip
        runs = {}
        for actors in (1, 2):
            out = work / f"out_{actors}_actors"
            shutil.rmtree(out, ignore_errors=True)
            runs[actors] = _run(model, images, out, actors, args)
            print(f"{actors} actor(s): {runs[actors]['wall_s']} s", file=sys.stderr, flush=True)
        if runs[1].pop("seeds") != runs[2].pop("seeds"):
            raise RuntimeError("the two runs gave the images different seeds")
        differences = _max_difference(work / "out_1_actors", work / "out_2_actors", stems)
        report.update(
            {
                "load_average_after": os.getloadavg(),
                "one_actor": runs[1],
                "two_actors": runs[2],
                "generation_ratio_two_over_one": round(runs[2]["generation_s"] / runs[1]["generation_s"], 3),
                "wall_ratio_two_over_one": round(runs[2]["wall_s"] / runs[1]["wall_s"], 3),
                "target_ratio": 0.6,
                "max_frame_difference_8bit": max(differences.values()),
                "frames_equal_within_tolerance": max(differences.values()) <= TOLERANCE,
            }
        )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
