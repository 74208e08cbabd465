"""Captions over textured, coloured backgrounds are read by the OCR stage (issue #33): each crop is read as
its colours' principal axis, contrast-stretched, strokes dark (ocr.reading_image). The benchmark's white
"SUBSCRIBE NOW" over a smooth colour texture read nothing before."""

from __future__ import annotations

import numpy as np
import pytest

from svd_fast.curation import ocr
from svd_fast.data import synthetic

pytestmark = pytest.mark.skipif(ocr.tesseract_unavailable_reason() is not None, reason=f"OCR cannot run: {ocr.tesseract_unavailable_reason()}")


def _captioned(background: np.ndarray, text: str, colour: str, size: int) -> tuple[np.ndarray, float]:
    """``background`` with ``text`` drawn; and the share of the frame the text's bounding box covers."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(background)
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((40, 200), text, font=font)
    draw.text((40, 200), text, fill=colour, font=font)
    return np.asarray(image), (right - left) * (bottom - top) / (background.shape[0] * background.shape[1])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("text", "colour"), [
    ("SUBSCRIBE NOW", "white"),
    pytest.param("LIVE TONIGHT", "yellow", marks=pytest.mark.xfail(strict=True, reason="open: the text-candidate gate (grey morphological gradient) finds no line in a yellow caption over this texture, so nothing is read")),
    ("BREAKING NEWS", "black"),
])
def test_caption_over_colour_texture_is_read(text: str, colour: str, seed: int) -> None:
    background = (synthetic.smooth_texture(480, 854, seed=seed) * 255).round().astype(np.uint8)
    frame, text_share = _captioned(background, text, colour, 80)
    coverage = ocr.text_coverage(frame)
    assert 0.5 * text_share <= coverage <= 2.0 * text_share, (coverage, text_share)


@pytest.mark.parametrize("seed", [0, 1])
def test_texture_without_text_reads_nothing(seed: int) -> None:
    for frame in ((synthetic.smooth_texture(480, 854, seed=seed) * 255).round().astype(np.uint8), synthetic.random_texture(480, 854, 3, seed=seed, colour=True)):
        assert ocr.text_coverage(frame) == 0.0


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("colour", ["white", "yellow", "black", "red"])
def test_reading_image_makes_the_strokes_dark(colour: str, seed: int) -> None:
    """Whatever the caption's colour and the ground's, the strokes come out dark on a light ground."""
    background = (synthetic.smooth_texture(96, 480, seed=seed) * 255).round().astype(np.uint8)
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(background)
    ImageDraw.Draw(image).text((8, 8), "CAPTION", fill=colour, font=ImageFont.load_default(size=64))
    captioned = np.asarray(image)
    strokes = np.abs(captioned.astype(int) - background.astype(int)).sum(axis=-1) > 60
    read = ocr.reading_image(captioned)[..., 0].astype(float)
    assert read[strokes].mean() + 60 < read[~strokes].mean(), (read[strokes].mean(), read[~strokes].mean())
