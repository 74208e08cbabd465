"""The demo's world: one disk on a lightly textured background, with known ground truth.

Red disks move right, blue disks move down, at a slow or a fast speed (pixels per frame at the demo's
resolution). The training set also holds static clips (curation must drop them) and clips with a hard cut
(curation must split them); the held-out set draws new backgrounds and disk positions from other seeds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from svd_fast.data.synthetic import smooth_texture, write_video

COLOURS = {"red": (0.9, 0.1, 0.1), "blue": (0.1, 0.2, 0.9)}
DIRECTIONS = {"red": (1.0, 0.0), "blue": (0.0, 1.0)}  # (dx, dy) in image coordinates: right, down
DISK_RADIUS_FRACTION = 0.125  # of the frame side: 4 px at 32x32
BACKGROUND_TEXTURE_AMPLITUDE = 0.12
HELD_OUT_SEED_OFFSET = 1_000_000  # held-out clips draw from seeds no training clip uses


@dataclass(frozen=True)
class ClipSpec:
    """One clip's ground truth: what the renderer draws and what the evaluation compares against."""

    name: str
    colour: str
    speed: str  # "slow", "fast" or "static"
    speed_px: float  # disk displacement per frame
    start_xy: tuple[float, float]
    background_seed: int
    background_level: float  # mean grey of the background

    def to_row(self) -> dict[str, object]:
        row = asdict(self)
        row["start_x"], row["start_y"] = row.pop("start_xy")
        return row


def background(size: int, seed: int, level: float) -> np.ndarray:
    """A grey background with a faint tint and a faint smooth texture, (size, size, 3) float in [0, 1]."""
    rng = np.random.default_rng(seed)
    tint = rng.uniform(-0.04, 0.04, size=3)
    texture = smooth_texture(size, size, seed) - 0.5
    return np.clip(level + tint + BACKGROUND_TEXTURE_AMPLITUDE * texture, 0.0, 1.0)


def render(spec: ClipSpec, num_frames: int, size: int) -> np.ndarray:
    """(num_frames, size, size, 3) uint8: the disk drawn anti-aliased (coverage from the distance to its edge)."""
    base = background(size, spec.background_seed, spec.background_level)
    colour = np.array(COLOURS[spec.colour])
    dx, dy = DIRECTIONS[spec.colour]
    radius = DISK_RADIUS_FRACTION * size
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    frames = []
    for index in range(num_frames):
        cx = spec.start_xy[0] + dx * spec.speed_px * index
        cy = spec.start_xy[1] + dy * spec.speed_px * index
        coverage = np.clip(radius + 0.5 - np.hypot(xs - cx, ys - cy), 0.0, 1.0)[..., None]
        frames.append(base * (1.0 - coverage) + colour * coverage)
    return (np.stack(frames) * 255.0).round().astype(np.uint8)


def draw_spec(rng: np.random.Generator, name: str, colour: str, speed: str, speeds: dict[str, float], num_frames: int, size: int, seed: int) -> ClipSpec:
    """A clip whose disk stays inside the frame at the fast speed, wherever it starts: start positions do not
    give the speed away."""
    radius = DISK_RADIUS_FRACTION * size
    travel = max(speeds.values()) * (num_frames - 1)
    along = rng.uniform(radius + 1.0, size - radius - 1.0 - travel)
    across = rng.uniform(radius + 1.0, size - radius - 1.0)
    start = (along, across) if DIRECTIONS[colour][0] else (across, along)
    return ClipSpec(
        name=name, colour=colour, speed=speed, speed_px=speeds.get(speed, 0.0), start_xy=(float(start[0]), float(start[1])),
        background_seed=seed, background_level=float(rng.uniform(0.35, 0.65)),
    )


def write_training_clips(folder: Path, reels: int, scenes_per_reel: int, num_frames: int, size: int, fps: int, speeds: dict[str, float], seed: int) -> list[ClipSpec]:
    """Training videos as lossless H.264 files in ``folder``: ``reels`` files of ``scenes_per_reel`` moving
    scenes joined by hard cuts (curation must split them; colours and speeds take turns), and one static clip
    per colour (curation must drop them). Returns the ground truth of every scene, named ``<file>#<scene>``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    kinds = [(colour, speed) for colour in COLOURS for speed in speeds]
    specs: list[ClipSpec] = []
    for reel in range(reels):
        name = f"reel_{reel:03d}.mp4"
        scenes = []
        for scene in range(scenes_per_reel):
            colour, speed = kinds[(reel + scene) % len(kinds)]
            spec = draw_spec(rng, f"{name}#{scene}", colour, speed, speeds, num_frames, size, seed * 10_000 + reel * scenes_per_reel + scene)
            # Backgrounds alternate dark and light, so every cut is one the detector cannot miss.
            spec = replace(spec, background_level=spec.background_level - 0.1 if scene % 2 else spec.background_level + 0.1)
            scenes.append(render(spec, num_frames, size))
            specs.append(spec)
        write_video(folder / name, np.concatenate(scenes), fps=fps, lossless=True)
    for index, colour in enumerate(COLOURS):
        spec = draw_spec(rng, f"static_{colour}.mp4", colour, "static", speeds, num_frames, size, seed * 10_000 + 9_000 + index)
        write_video(folder / spec.name, render(spec, num_frames, size), fps=fps, lossless=True)
        specs.append(spec)
    return specs


def held_out_specs(count: int, num_frames: int, size: int, speeds: dict[str, float], seed: int) -> list[ClipSpec]:
    """``count`` first frames for evaluation, colours alternating, from seeds no training clip uses."""
    rng = np.random.default_rng(seed + HELD_OUT_SEED_OFFSET)
    colours = list(COLOURS)
    return [
        draw_spec(rng, f"held_out_{index:02d}", colours[index % len(colours)], "first_frame", speeds, num_frames, size, seed + HELD_OUT_SEED_OFFSET + index)
        for index in range(count)
    ]
