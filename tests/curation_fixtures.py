"""Footage the curation test modules share."""

from __future__ import annotations

import numpy as np

from svd_fast.data import synthetic


def edited_footage(first: int, second: int, third: int) -> np.ndarray:
    """Three textured shots of ``first``, ``second`` and ``third`` frames (a vertical pan, a horizontal pan, a still)
    joined by a hard cut and a 15-frame dissolve, then a 12-frame fade to black (its last frame black), 54x96 RGB."""
    shot_1 = synthetic.translating_texture(first, 54, 96, (0, 2), seed=1)
    shot_2 = synthetic.translating_texture(second, 54, 96, (1, 0), seed=2)
    shot_3 = synthetic.translating_texture(third, 54, 96, (0, 0), seed=3)
    fade = (shot_3[-1][None].astype(np.float32) * np.linspace(1, 0, 12)[:, None, None, None]).astype(np.uint8)
    return np.concatenate([shot_1, shot_2, synthetic.blend(shot_2, shot_3, 15), shot_3, fade])
