"""OCR text coverage with Tesseract (pytesseract): the fraction of the frame covered by confidently read words."""

from __future__ import annotations

import shutil

import numpy as np


def tesseract_unavailable_reason() -> str | None:
    """None when OCR can run, else why not (recorded in the manifest instead of failing the run)."""
    try:
        import pytesseract  # noqa: F401, PLC0415
    except ImportError:
        return "pytesseract is not installed"
    if shutil.which("tesseract") is None:
        return "the tesseract binary is not on PATH"
    return None


def text_coverage(frame: np.ndarray, min_confidence: float = 60.0) -> float:
    """Area of word boxes with confidence > ``min_confidence`` (0..100) over the frame area, for (H, W, 3) uint8."""
    import pytesseract  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"text_coverage: frame must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
    data = pytesseract.image_to_data(Image.fromarray(frame), output_type=pytesseract.Output.DICT)
    height, width = frame.shape[:2]
    covered = np.zeros((height, width), dtype=bool)  # a mask, so overlapping boxes are not counted twice
    for text, confidence, left, top, box_width, box_height in zip(
        data["text"], data["conf"], data["left"], data["top"], data["width"], data["height"]
    ):
        if text.strip() and float(confidence) > min_confidence:
            covered[top : top + box_height, left : left + box_width] = True
    return float(covered.mean())
