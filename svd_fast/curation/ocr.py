"""OCR text coverage with Tesseract (pytesseract): the fraction of the frame covered by confidently read words.

Tesseract costs 1-3 s on a full 480p frame, most of it page-layout analysis of texture that holds no text.
So :func:`text_coverage` first runs a cheap OpenCV gate (:func:`text_candidate_boxes`, the classic
"text region" heuristic: morphological gradient, Otsu threshold, horizontal closing, then connected
components shaped and filled like text lines) and sends Tesseract only the candidate crops, packed into one
small image, each scaled down where its line is taller than Tesseract needs. A frame without candidates
has coverage 0 without running Tesseract. Coverage is still the area of the confidently read word boxes
(mapped back to frame coordinates) over the frame area; ``gate=False`` runs Tesseract on the whole frame.

The pipeline splits this in two: the decoding pass takes :func:`text_candidate_crops` of its 2-FPS samples
(small, JSON-serialisable with :meth:`TextCrop.to_json`), and the OCR stage reads the key frames' crops with
:func:`crop_coverages`, so no frame is decoded twice.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Gate parameters, in pixels of the frame as given.
MIN_LINE_HEIGHT = 8  # text lower than this is not read reliably by Tesseract anyway
MAX_LINE_HEIGHT_FRACTION = 0.5  # a "line" taller than half the frame is texture, not text
MIN_ASPECT = 1.0  # a text line (even a 2-letter word) is at least as wide as tall
MIN_FILL = 0.35  # fraction of edge pixels inside a candidate box (text strokes are dense)
MIN_EDGE_CONTRAST = 64  # edge threshold floor (grey levels of the 3x3 gradient): fainter edges are not text Tesseract reads
TARGET_LINE_HEIGHT = 48  # crops whose line is taller are scaled down to about this height for Tesseract
MARGIN_FRACTION = 0.25  # crop margin around a candidate box, as a fraction of its height (at least 4 px)
TILE_GAP = 12  # rows of padding between crops packed into one image
GATE_LEVELS = 3
STRETCH_PERCENTILE = 1.0  # contrast stretch of a crop before reading: these percentiles go to black and white  # pyramid levels the gate looks at: full, 1/2 and 1/4 resolution


def tesseract_unavailable_reason() -> str | None:
    """None when OCR can run, else why not (recorded in the manifest instead of failing the run)."""
    try:
        import pytesseract  # noqa: F401, PLC0415 - optional dependency (OCR)
    except ImportError:
        return "pytesseract is not installed"
    if shutil.which("tesseract") is None:
        return "the tesseract binary is not on PATH"
    return None


def _check_frame(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"text_coverage: frame must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
    return frame


def text_candidate_boxes(frame: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Text-line-like regions of an (H, W, 3) uint8 frame as (left, top, width, height) boxes; [] when none.

    On full, 1/2 and 1/4 resolution: morphological gradient (strokes light up, smooth areas do not), Otsu
    threshold (at least MIN_EDGE_CONTRAST), a horizontal closing that joins the letters of a line, then connected
    components kept when they are as tall as text can be, wider than tall and dense in edge pixels. Boxes from
    different levels may overlap. Recall matters more than precision: a false candidate costs one crop.
    """
    import cv2  # noqa: PLC0415 - OpenCV is optional (the data extra)

    frame = _check_frame(frame)
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    boxes: list[tuple[int, int, int, int]] = []
    # A pyramid, so large letters (whose 3x3 gradient is only an outline) are seen with thin, dense strokes too.
    for level in range(GATE_LEVELS):
        if level:
            gray = cv2.pyrDown(gray)
            if min(gray.shape) < 2 * MIN_LINE_HEIGHT:
                break
        factor = 2**level
        boxes += [(left * factor, top * factor, w * factor, h * factor) for left, top, w, h in _line_boxes(gray)]
    return boxes


def _line_boxes(gray: np.ndarray) -> list[tuple[int, int, int, int]]:
    """:func:`text_candidate_boxes` at one pyramid level."""
    import cv2  # noqa: PLC0415 - OpenCV is optional (the data extra)

    height, width = gray.shape
    gradient = cv2.morphologyEx(gray, cv2.MORPH_GRADIENT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    if int(gradient.max()) < MIN_EDGE_CONTRAST:  # nothing with the contrast of text (uniform, blurred, dark)
        return []
    otsu, _ = cv2.threshold(gradient, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    _, binary = cv2.threshold(gradient, max(otsu, MIN_EDGE_CONTRAST - 1), 255, cv2.THRESH_BINARY)
    closed = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (9, 1)))
    count, _, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=8)
    boxes = []
    for left, top, box_width, box_height, _area in stats[1:count]:
        if not MIN_LINE_HEIGHT <= box_height <= MAX_LINE_HEIGHT_FRACTION * height or box_width < MIN_ASPECT * box_height:
            continue
        if np.count_nonzero(binary[top : top + box_height, left : left + box_width]) < MIN_FILL * box_width * box_height:
            continue
        boxes.append((int(left), int(top), int(box_width), int(box_height)))
    return boxes


def _read_words(image: np.ndarray, min_confidence: float) -> list[tuple[int, int, int, int]]:
    """Tesseract's word boxes (left, top, width, height) read with confidence > ``min_confidence``."""
    import cv2  # noqa: PLC0415 - OpenCV is optional (the data extra)
    import pytesseract  # noqa: PLC0415 - optional dependency (OCR)

    # Tesseract reads a file; written here with light PNG compression (pytesseract's own PIL default level costs
    # as much as a quarter of a Tesseract call on a packed image of crops).
    with tempfile.TemporaryDirectory(prefix="svd_fast_ocr_") as folder:
        path = str(Path(folder) / "image.png")
        if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise OSError(f"could not write the OCR input image to {path}")
        data = pytesseract.image_to_data(path, output_type=pytesseract.Output.DICT)
    return [
        (int(left), int(top), int(box_width), int(box_height))
        for text, confidence, left, top, box_width, box_height in zip(
            data["text"], data["conf"], data["left"], data["top"], data["width"], data["height"]
        )
        if text.strip() and float(confidence) > min_confidence
    ]


def _merge_boxes(boxes: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Merge overlapping (x0, y0, x1, y1) boxes until none overlap (crops must not repeat pixels)."""
    merged = list(boxes)
    changed = True
    while changed:
        changed = False
        out: list[tuple[int, int, int, int]] = []
        for box in merged:
            for index, other in enumerate(out):
                if box[0] < other[2] and other[0] < box[2] and box[1] < other[3] and other[1] < box[3]:
                    out[index] = (min(box[0], other[0]), min(box[1], other[1]), max(box[2], other[2]), max(box[3], other[3]))
                    changed = True
                    break
            else:
                out.append(box)
        merged = out
    return merged


@dataclass(frozen=True)
class TextCrop:
    """One region of a frame to read: ``image`` (h, w, 3) uint8 is frame[y0:y0 + h / scale, x0:x0 + w / scale] scaled by ``scale``."""

    x0: int
    y0: int
    scale: float
    image: np.ndarray

    def to_json(self) -> list:
        """[x0, y0, scale, PNG as base64]: a work item's state is JSON (it travels between Ray stages)."""
        import cv2  # noqa: PLC0415 - OpenCV is optional (the data extra)

        _, png = cv2.imencode(".png", self.image)
        return [self.x0, self.y0, self.scale, base64.b64encode(png.tobytes()).decode("ascii")]

    @classmethod
    def from_json(cls, value: list) -> TextCrop:
        import cv2  # noqa: PLC0415 - OpenCV is optional (the data extra)

        x0, y0, scale, png = value
        return cls(int(x0), int(y0), float(scale), cv2.imdecode(np.frombuffer(base64.b64decode(png), np.uint8), cv2.IMREAD_UNCHANGED))


def text_candidate_crops(frame: np.ndarray) -> list[TextCrop]:
    """The crops Tesseract reads for ``frame``: :func:`text_candidate_boxes` with a margin, merged where they
    overlap, each scaled down where its lowest line is taller than Tesseract needs. [] when no candidates."""
    import cv2  # noqa: PLC0415 - OpenCV is optional (the data extra)

    frame = _check_frame(frame)
    boxes = text_candidate_boxes(frame)
    height, width = frame.shape[:2]
    regions = []
    for left, top, box_width, box_height in boxes:
        margin = max(4, int(MARGIN_FRACTION * box_height))
        regions.append((max(0, left - margin), max(0, top - margin), min(width, left + box_width + margin), min(height, top + box_height + margin)))
    crops = []
    for x0, y0, x1, y1 in sorted(_merge_boxes(regions), key=lambda region: (region[1], region[0])):
        crop = frame[y0:y1, x0:x1]
        # Scale by the lowest candidate line inside the crop, so no line gets below TARGET_LINE_HEIGHT px.
        line_height = min([box[3] for box in boxes if x0 <= box[0] < x1 and y0 <= box[1] < y1] or [y1 - y0])
        scale = min(1.0, TARGET_LINE_HEIGHT / line_height)
        if scale < 1.0:
            size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
            crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        crops.append(TextCrop(int(x0), int(y0), float(scale), np.ascontiguousarray(crop)))
    return crops


def crop_coverages(crops_per_frame: list[list[TextCrop]], frame_shape: tuple[int, ...], min_confidence: float = 60.0) -> list[float]:
    """Text coverage of each frame (all of ``frame_shape``) from its :func:`text_candidate_crops`, reading the crops
    of all frames packed into one image for a single Tesseract call (its start-up costs as much as reading a few
    crops); no call when there are no crops."""
    return [_coverage(frame_shape, words) for words in _pack_and_read(crops_per_frame, min_confidence)]


def reading_image(image: np.ndarray) -> np.ndarray:
    """An (h, w, 3) uint8 crop as Tesseract reads it (RGB, as the crops): the crop's colours projected on their
    principal axis (the direction of most contrast: text against its ground, whatever the two colours; a yellow
    caption over light texture has little contrast in grey), stretched so its 1st..99th percentiles span 0..255,
    and turned so that the Otsu class with fewer pixels (the strokes: a candidate box is mostly ground) is dark,
    which is what Tesseract reads best."""
    import cv2  # noqa: PLC0415 - OpenCV loads only when this runs

    pixels = image.reshape(-1, 3).astype(np.float32)
    centred = pixels - pixels.mean(axis=0)
    axis = np.linalg.eigh(centred.T @ centred)[1][:, -1]
    projected = (centred @ axis).reshape(image.shape[:2])
    low, high = np.percentile(projected, (STRETCH_PERCENTILE, 100 - STRETCH_PERCENTILE))
    stretched = np.clip((projected - low) * (255.0 / max(float(high - low), 1.0)), 0, 255).astype(np.uint8)
    _, classes = cv2.threshold(stretched, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    if np.count_nonzero(classes) < classes.size / 2:
        stretched = 255 - stretched
    return cv2.cvtColor(stretched, cv2.COLOR_GRAY2RGB)


def _pack_and_read(crops_per_frame: list[list[TextCrop]], min_confidence: float) -> list[list[tuple[int, int, int, int]]]:
    """Word boxes per frame, in frame coordinates, from one Tesseract call on all crops packed into one image."""
    import cv2  # noqa: PLC0415 - OpenCV is optional (the data extra)

    # Each crop as :func:`reading_image`: Tesseract misses a light or coloured caption over texture as given.
    tiles = [TextCrop(crop.x0, crop.y0, crop.scale, reading_image(crop.image)) for crops in crops_per_frame for crop in crops]
    owners = [frame_index for frame_index, crops in enumerate(crops_per_frame) for _ in crops]
    words: list[list[tuple[int, int, int, int]]] = [[] for _ in crops_per_frame]
    if not tiles:
        return words
    packed_width = max(tile.image.shape[1] for tile in tiles) + 2 * TILE_GAP
    rows, offsets, row = [], [], 0
    for tile in tiles:
        rows.append(cv2.copyMakeBorder(tile.image, TILE_GAP, TILE_GAP, TILE_GAP, packed_width - tile.image.shape[1] - TILE_GAP, cv2.BORDER_REPLICATE))
        offsets.append(row + TILE_GAP)
        row += rows[-1].shape[0]
    for left, top, box_width, box_height in _read_words(np.ascontiguousarray(np.concatenate(rows)), min_confidence):
        index = int(np.searchsorted(offsets, top + box_height / 2, side="right")) - 1
        if index < 0:
            continue
        tile = tiles[index]
        tile_height, tile_width = tile.image.shape[:2]
        # Clip to the tile (a word box may reach into the padding), then back to frame pixels.
        tx0, ty0 = max(0, left - TILE_GAP), max(0, top - offsets[index])
        tx1, ty1 = min(tile_width, left + box_width - TILE_GAP), min(tile_height, top + box_height - offsets[index])
        if tx1 <= tx0 or ty1 <= ty0:
            continue
        fx0, fy0 = tile.x0 + int(np.floor(tx0 / tile.scale)), tile.y0 + int(np.floor(ty0 / tile.scale))
        fx1, fy1 = tile.x0 + int(np.ceil(tx1 / tile.scale)), tile.y0 + int(np.ceil(ty1 / tile.scale))
        words[owners[index]].append((fx0, fy0, fx1 - fx0, fy1 - fy0))
    return words


def _coverage(shape: tuple[int, ...], words: list[tuple[int, int, int, int]]) -> float:
    covered = np.zeros(shape[:2], dtype=bool)  # a mask, so overlapping boxes are not counted twice
    for left, top, box_width, box_height in words:
        covered[max(0, top) : top + box_height, max(0, left) : left + box_width] = True
    return float(covered.mean())


def text_coverages(frames: list[np.ndarray] | np.ndarray, min_confidence: float = 60.0, gate: bool = True) -> list[float]:
    """:func:`text_coverage` of each frame; with ``gate``, one Tesseract call for all of them (none without candidates)."""
    frames = [_check_frame(frame) for frame in frames]
    if not gate:
        return [_coverage(frame.shape, _read_words(frame, min_confidence)) for frame in frames]
    words = _pack_and_read([text_candidate_crops(frame) for frame in frames], min_confidence)
    return [_coverage(frame.shape, frame_words) for frame, frame_words in zip(frames, words)]


def text_coverage(frame: np.ndarray, min_confidence: float = 60.0, gate: bool = True) -> float:
    """Area of word boxes with confidence > ``min_confidence`` (0..100) over the frame area, for (H, W, 3) uint8.

    ``gate`` (default): read only :func:`text_candidate_boxes` crops (0.0 without calling Tesseract when there
    are none); False: Tesseract on the whole frame, the reference the gate is tested against.
    """
    return text_coverages([frame], min_confidence, gate)[0]
