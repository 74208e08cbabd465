"""The curation pipeline: stages over one input file each, run locally or as Ray Data stages.

A work item is a dict {"path", "caption", "file_key", "state"} where ``state`` is a JSON string (so Ray
Data moves it as one Arrow string column) holding the video info, the clips and their scores, the
skipped stages and any error. Stages, in order:

  stage_analyse  ONE decoding pass: transitions at 3 frame rates -> clips; 2-FPS grayscale samples -> optical
                 flow, motion columns, static flag; codec motion vectors; the text-candidate crops of each clip's
                 first, middle and last 2-FPS sample (svd_fast.curation.analysis)                      (GPU stage)
  stage_ocr      those crops -> Tesseract text coverage, one call per file (a clip shorter than the 2-FPS step
                 holds no sample: its first/middle/last frames are decoded by seeking)
  ClipStage      first/middle/last frame of each clip, decoded by seeking -> CLIP embedding, aesthetic score,
                 caption similarity                                                                    (GPU stage)

Every stage records a per-file failure in ``state["error"]`` and later stages pass such files through, so
one bad file never stops the run. Finished files are written as manifest parts immediately.

Defaults a user can train on: static clips (see analysis.py for the three reasons) get keep=False unless
``drop_static=False``; ``static_threshold`` (flow_mean_norm, i.e. per 0.5 s over the diagonal) is 1e-3, about
2 px/s on 480p; the codec prefilter calls a clip static below ``codec_static_threshold_px`` mean motion vector
(calibrated on generated x264 clips: see bench/bench_curation.py and tests/test_curation_motion.py).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from svd_fast._ray import cluster_gpus, ray_session
from svd_fast.curation import analysis, flow, manifest, ocr
from svd_fast.curation.filters import apply_filters, parse_filter
from svd_fast.data.decode import VIDEO_SUFFIXES, VideoDecodeError, decode_frames_at_times

# Part keys include this: bump it when a measurement changes (2: OCR on gated text-candidate crops; 3: OCR key
# frames on the 2-FPS grid; 4: the noise-aware, confidence-weighted motion score and OCR of both polarities), so reruns recompute parts written by older code instead of mixing old and new values in one manifest.
MEASUREMENT_VERSION = 4


class CurationRequestError(ValueError):
    """A problem with what was asked (inputs, filters, settings), found before any file is processed."""


@dataclass
class CurationConfig:
    cut_threshold: float = 27.0
    min_scene_frames: int = 8
    cut_max_side: int = 96
    flow_fps: float = 2.0
    flow_max_side: int = 256
    flow_backend: str = "auto"  # "auto" (opencv on CPU, torch on CUDA), "opencv", "torch", "dali" (untested)
    static_threshold: float = 1e-3  # flow_mean_norm below this marks a clip static
    drop_static: bool = True  # static clips get keep=False
    min_texture: float = 0.004  # texture_level (mean local contrast, [0, 1] grey) below which a frame has no measurable motion
    codec_static_prefilter: bool = True  # clips whose codec motion vectors are below the threshold skip dense flow (static)
    codec_static_threshold_px: float = 0.1  # px; static x264 clips with sensor-like noise: <= 0.03, a 0.25 px/frame pan: >= 0.4
    ocr: bool = True
    ocr_min_confidence: float = 60.0
    ocr_max_side: int = 1024
    clip_model: str | None = None
    aesthetic_head: str | None = None
    device: str | None = None  # None: CUDA when available, else CPU

    def __post_init__(self) -> None:
        if self.flow_backend not in flow.FLOW_BACKENDS:
            raise ValueError(f"flow_backend must be one of {', '.join(flow.FLOW_BACKENDS)}, got {self.flow_backend!r}")
        for name in ("cut_threshold", "flow_fps"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("static_threshold", "min_texture", "codec_static_threshold_px"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        for name in ("min_scene_frames", "cut_max_side", "flow_max_side", "ocr_max_side"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or getattr(self, name) < (1 if name == "min_scene_frames" else 16):
                raise ValueError(f"{name} must be a whole number >= {1 if name == 'min_scene_frames' else 16}, got {getattr(self, name)!r}")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"device {self.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r}: no CUDA device is available")
            if device.type not in ("cpu", "cuda"):
                raise ValueError(f"device {self.device!r}: curation runs on cpu or cuda")

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def fingerprint(self) -> str:
        """The settings that affect a file's rows (all of them) and the measurement version, for the part keys."""
        return json.dumps({"measurement_version": MEASUREMENT_VERSION, **asdict(self)}, sort_keys=True)


def make_item(path: str | Path, caption: str | None = None, config: CurationConfig | None = None) -> dict[str, str]:
    path = Path(path).absolute()
    key = manifest.file_key(path, (config or CurationConfig()).fingerprint())
    return {"path": str(path), "caption": caption or "", "file_key": key, "state": json.dumps({"clips": [], "skipped": {}, "error": None})}


def _load(item: dict) -> dict:
    return json.loads(item["state"])


def _store(item: dict, state: dict) -> dict:
    return {**item, "state": json.dumps(state)}


def _guarded(stage_name: str, body: Callable[[dict, dict, CurationConfig], None]) -> Callable[..., dict]:
    """Run ``body(item, state, config)`` unless the file already failed; record a failure instead of raising."""

    def run(item: dict, config: CurationConfig | None = None) -> dict:
        state = _load(item)
        if state["error"]:
            return item
        try:
            body(item, state, config or CurationConfig())
        except VideoDecodeError as error:  # its message already names the file and the reason
            state["error"] = f"{stage_name}: {error}"
        except Exception as error:  # noqa: BLE001 - a per-file failure must not stop the run; the reason goes to the manifest
            state["error"] = f"{stage_name}: {type(error).__name__}: {error}"
        return _store(item, state)

    run.__name__ = f"stage_{stage_name}"
    return run


def _analyse_body(item: dict, state: dict, config: CurationConfig) -> None:
    device = config.torch_device()
    ocr_runs = config.ocr and ocr.tesseract_unavailable_reason() is None
    scan = analysis.scan_video(item["path"], config.cut_max_side, config.flow_max_side, config.flow_fps, config.ocr_max_side if ocr_runs else None)
    state["info"] = {"fps": scan.fps, "num_frames": len(scan.times), "width": scan.width, "height": scan.height, "codec": scan.codec}
    clips, transitions = analysis.clips_from_scan(scan, config.cut_threshold, config.min_scene_frames, device)
    settings = analysis.MotionSettings(
        config.flow_backend, device, config.static_threshold, config.min_texture,
        config.codec_static_threshold_px if config.codec_static_prefilter else None,
    )
    analysis.measure_motion(scan, clips, settings)
    state["clips"], state["transitions"] = clips, transitions
    if ocr_runs:  # for stage_ocr, which drops them: [per clip: [per key frame: crops] or None (decode by seeking)]
        per_clip = [analysis.key_text_crops(scan, clip) for clip in clips]
        state["key_text_crops"] = [None if frames is None else [[crop.to_json() for crop in crops] for crops in frames] for frames in per_clip]
        state["text_frame_shape"] = scan.text_frame_shape


def _key_frames_per_clip(path: str, clips: list[dict], max_side: int | None) -> list[np.ndarray]:
    """The clips' key frames (first, middle, last), decoded by seeking: one (K, H, W, 3) array per clip."""
    frames = decode_frames_at_times(path, [moment for clip in clips for moment in clip["key_times"]], max_side=max_side)
    bounds = np.cumsum([0, *(len(clip["key_times"]) for clip in clips)])
    return [frames[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def _ocr_body(item: dict, state: dict, config: CurationConfig) -> None:
    stored, shape = state.pop("key_text_crops", None), state.pop("text_frame_shape", None)
    reason = None if config.ocr else "disabled"
    reason = reason or ocr.tesseract_unavailable_reason()
    if reason:
        state["skipped"]["ocr"] = reason
        return
    if not state["clips"]:
        return
    if stored is None:  # analysed without crops (OCR was unavailable then): every clip by seeking
        stored = [None] * len(state["clips"])
    by_seeking = [clip for clip, crops in zip(state["clips"], stored) if crops is None]
    seeked = iter(_key_frames_per_clip(item["path"], by_seeking, config.ocr_max_side) if by_seeking else [])
    crops_per_clip = []
    for crops in stored:
        if crops is None:
            frames = next(seeked)
            crops_per_clip.append([ocr.text_candidate_crops(frame) for frame in frames])
            shape = frames.shape[1:]
        else:
            crops_per_clip.append([[ocr.TextCrop.from_json(crop) for crop in frame_crops] for frame_crops in crops])
    # All key frames of the file (one frame size) in one Tesseract call, on their candidate crops only.
    coverages = iter(ocr.crop_coverages([frame_crops for crops in crops_per_clip for frame_crops in crops], tuple(shape), config.ocr_min_confidence))
    for clip, crops in zip(state["clips"], crops_per_clip):
        # The worst frame decides: text anywhere is text.
        clip["ocr_coverage"] = max(next(coverages) for _ in crops)


stage_analyse = _guarded("analyse", _analyse_body)
stage_ocr = _guarded("ocr", _ocr_body)


class ClipStage:
    """CLIP scores; a class so Ray (and the local loop) load the model once per worker."""

    def __init__(self, config: CurationConfig) -> None:
        self.config = config
        self.scorer = None
        if config.clip_model:
            from svd_fast.curation.clip_scores import ClipScorer  # noqa: PLC0415 - transformers import is slow

            self.scorer = ClipScorer(config.clip_model, config.aesthetic_head, config.torch_device())

    def _body(self, item: dict, state: dict, config: CurationConfig) -> None:
        if self.scorer is None:
            state["skipped"]["clip"] = "no model given"
            return
        if self.scorer.tokenizer is None and item["caption"]:
            state["skipped"]["clip_text"] = self.scorer.tokenizer_missing_reason
        if not state["clips"]:
            return
        for clip, frames in zip(state["clips"], _key_frames_per_clip(item["path"], state["clips"], max_side=None)):
            clip.update(self.scorer.score(frames, item["caption"] or None))

    def __call__(self, item: dict) -> dict:
        return _guarded("clip", self._body)(item, self.config)


def rows_from_item(item: dict) -> list[dict]:
    """Manifest rows for one finished item: one per clip, or one error row."""
    state = _load(item)
    info = state.get("info") or {}
    skipped = "; ".join(f"{stage}: {reason}" for stage, reason in state["skipped"].items()) or None
    base = {
        "source": item["path"],
        "file_key": item["file_key"],
        "caption": item["caption"] or None,
        "fps": info.get("fps"),
        "width": info.get("width"),
        "height": info.get("height"),
        "codec": info.get("codec"),
        "skipped": skipped,
    }
    if state["error"] or not state["clips"]:
        return [{**base, "clip_index": -1, "error": state["error"] or "no clips"}]
    rows = []
    for index, clip in enumerate(state["clips"]):
        clip_skipped = "; ".join(filter(None, [skipped, f"flow: {clip['skipped_flow']}" if "skipped_flow" in clip else None])) or None
        rows.append({**base, **clip, "clip_index": index, "num_frames": clip["end_frame"] - clip["start_frame"], "skipped": clip_skipped, "error": None})
    return rows


def list_inputs(source: str | Path, manifest_path: str | Path | None = None) -> list[tuple[Path, str | None]]:
    """A directory (every non-hidden video file below it, by suffix; the manifest's own files never) or a list
    file: one path per line, optionally followed by a tab and a caption; relative paths are relative to the
    list file. Raises :class:`CurationRequestError` for a missing source or a directory without videos."""
    source = Path(source)
    if source.is_dir():
        own = set()
        if manifest_path is not None:
            manifest_path = Path(manifest_path).absolute()
            own = {manifest_path, manifest.parts_dir(manifest_path), manifest_path.with_name(manifest_path.name + ".lock")}
        files = [
            path for path in sorted(source.rglob("*"))
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(source).parts)
            and not own.intersection({path.absolute(), *path.absolute().parents})
        ]
        videos = [path for path in files if path.suffix.lower() in VIDEO_SUFFIXES]
        if not videos:
            others = ", ".join(path.name for path in files[:3]) or "nothing"
            raise CurationRequestError(f"--input {source} holds no video files (found {len(files)} other files: {others}; videos end in {', '.join(sorted(VIDEO_SUFFIXES))})")
        return [(path, None) for path in videos]
    if source.is_file():
        entries = []
        for line in source.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            path_text, _, caption = line.partition("\t")
            path = Path(path_text.strip())
            entries.append((path if path.is_absolute() else source.parent / path, caption.strip() or None))
        if not entries:
            raise CurationRequestError(f"--input {source} lists no files")
        return entries
    raise CurationRequestError(f"--input {source} does not exist (give a directory of videos or a list file)")


def check_filters(filters: Iterable[str]) -> list:
    """Parse the filter texts and check their columns exist in the manifest, before any work."""
    parsed = []
    for spec in filters:
        try:
            parsed.append(parse_filter(spec))
        except ValueError as error:
            raise CurationRequestError(str(error)) from None
        if parsed[-1].column not in manifest.SCHEMA.names:
            numeric = [field.name for field in manifest.SCHEMA if str(field.type) in ("double", "int32", "int64")]
            raise CurationRequestError(f"filter {spec!r}: no column {parsed[-1].column!r} in the manifest (numeric columns: {', '.join(numeric)})")
    return parsed


def _run_local(items: list[dict], config: CurationConfig, on_done: Callable[[dict], None]) -> None:
    clip_stage = ClipStage(config)
    for item in items:
        for stage in (stage_analyse, stage_ocr):
            item = stage(item, config)
        on_done(clip_stage(item))


def _run_ray(items: list[dict], config: CurationConfig, address: str, on_done: Callable[[dict], None]) -> None:
    """Ray Data stages (workers must see the input paths, e.g. a shared filesystem). GPU stages ask for a
    whole GPU per task/actor when the cluster has GPUs; the CLIP actor pool is one actor per GPU."""
    with ray_session(address) as ray:
        gpus = 1 if cluster_gpus(ray) else 0
        dataset = ray.data.from_items(items)
        dataset = dataset.map(stage_analyse, fn_kwargs={"config": config}, num_gpus=gpus)
        dataset = dataset.map(stage_ocr, fn_kwargs={"config": config})
        dataset = dataset.map(ClipStage, fn_constructor_kwargs={"config": config}, concurrency=max(1, cluster_gpus(ray)) if config.clip_model else 1, num_gpus=gpus if config.clip_model else 0)
        for item in dataset.iter_rows():  # streamed: each finished file is written as it arrives
            on_done(dict(item))


def curate(
    inputs: Iterable[tuple[str | Path, str | None]] | str | Path,
    manifest_path: str | Path,
    config: CurationConfig | None = None,
    filters: Iterable[str] = (),
    ray_address: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Curate ``inputs`` (a directory, a list file, or (path, caption) pairs) into ``manifest_path``.

    Everything that can be checked before processing is (inputs, filters, settings, a concurrent run on the
    same manifest: :class:`CurationRequestError` / :class:`~svd_fast.curation.manifest.ManifestBusyError`).
    Files whose part is complete for the same content and settings are skipped (resume). Returns a summary:
    files processed/skipped/failed (with each failure), clips, per-filter removals, seconds.
    """
    config = config or CurationConfig()
    manifest_path = Path(manifest_path).absolute()
    parsed_filters = check_filters(filters)
    if config.flow_backend == "dali" and not ray_address and flow.dali_unavailable_reason():
        raise CurationRequestError(f"flow_backend 'dali' cannot run here: {flow.dali_unavailable_reason()} (use 'auto', 'opencv' or 'torch')")
    if isinstance(inputs, (str, Path)):
        entries = list_inputs(inputs, manifest_path)
    else:
        entries = [(Path(path), caption) for path, caption in inputs]
    started = time.perf_counter()
    with manifest.lock(manifest_path):
        # A file listed twice is one unit of work (and one part).
        items = list({item["file_key"]: item for item in (make_item(path, caption, config) for path, caption in entries)}.values())
        todo = [item for item in items if not manifest.part_is_complete(manifest_path, item["file_key"])]

        def on_done(item: dict) -> None:
            manifest.write_part(manifest_path, item["file_key"], rows_from_item(item))
            if progress:
                progress(f"done {item['path']}")

        if todo:
            if ray_address:
                _run_ray(todo, config, ray_address, on_done)
            else:
                _run_local(todo, config, on_done)
        table = manifest.read_parts(manifest_path, [item["file_key"] for item in items])
        table, removed = apply_filters(table, parsed_filters)
        if config.drop_static:
            static = table["static"].fillna(False).astype(bool)
            removed["static"] = int((table["keep"] & static).sum())
            table["keep"] = table["keep"] & ~static
            removed["kept"] = int(table["keep"].sum())
        manifest.write_manifest(manifest_path, table)
    failed = table[table["error"].notna()]
    return {
        "files": len(items),
        "files_processed": len(todo),
        "files_skipped_finished": len(items) - len(todo),
        "files_failed": len(failed),
        "failures": [{"source": row.source, "error": row.error} for row in failed.itertuples()],
        "clips": int((table["clip_index"] >= 0).sum()),
        "removed_by_filter": removed,
        "seconds": round(time.perf_counter() - started, 3),
        "config": asdict(config),
    }
