"""The curation pipeline: stages over one input file each, run locally or as Ray Data stages.

A work item is a dict {"path", "caption", "file_key", "state"} where ``state`` is a JSON string (so Ray
Data moves it as one Arrow string column) holding the video info, the clips and their scores, the
skipped stages and any error. Stages, in order:

  stage_cuts   decode at 96 px, content detector at 3 frame rates -> clips (+ codec motion vectors, free)
  stage_flow   frames at 2 FPS per clip -> mean flow magnitude, motion_bucket_id, static flag   (GPU stage)
  stage_ocr    first/middle/last frames -> Tesseract text coverage
  ClipStage    first/middle/last frames -> CLIP embedding, aesthetic score, caption similarity (GPU stage)

Every stage records a per-file failure in ``state["error"]`` and later stages pass such files through, so
one bad file never stops the run. Finished files are written as manifest parts immediately.
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

from svd_fast.curation import cuts, flow, manifest, ocr
from svd_fast.curation.filters import apply_filters, parse_filter
from svd_fast.data.video import VideoDecodeError, decode_all_frames_with_motion, decode_frames, probe_video


@dataclass
class CurationConfig:
    cut_threshold: float = 27.0
    min_scene_frames: int = 8
    cut_strides: tuple[int, ...] = cuts.DEFAULT_STRIDES
    cut_max_side: int = 96
    flow_fps: float = 2.0
    flow_max_side: int = 256
    flow_backend: str = "auto"  # "auto" (DALI where supported, else torch), "torch", "dali"
    static_threshold: float = 1e-3  # flow_mean_norm below this marks a clip static
    codec_static_prefilter: bool = False  # clips whose codec motion vectors are all zero skip dense flow (static)
    ocr: bool = True
    ocr_min_confidence: float = 60.0
    ocr_max_side: int = 1024
    clip_model: str | None = None
    aesthetic_head: str | None = None
    device: str | None = None  # None: CUDA when available, else CPU

    def __post_init__(self) -> None:
        if self.flow_backend not in ("auto", "torch", "dali"):
            raise ValueError(f"CurationConfig: flow_backend must be 'auto', 'torch' or 'dali', got {self.flow_backend!r}")
        if self.flow_fps <= 0:
            raise ValueError(f"CurationConfig: flow_fps must be > 0, got {self.flow_fps}")
        self.cut_strides = tuple(int(stride) for stride in self.cut_strides)

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def make_item(path: str | Path, caption: str | None = None) -> dict[str, str]:
    return {"path": str(path), "caption": caption or "", "file_key": manifest.file_key(path), "state": json.dumps({"clips": [], "skipped": {}, "error": None})}


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


def _cuts_body(item: dict, state: dict, config: CurationConfig) -> None:
    info = probe_video(item["path"])
    frames, codec_motion = decode_all_frames_with_motion(item["path"], max_side=config.cut_max_side)
    found = cuts.detect_cuts(
        frames, threshold=config.cut_threshold, min_scene_frames=config.min_scene_frames, strides=config.cut_strides, device=config.torch_device()
    )
    state["info"] = {"fps": info.fps, "num_frames": int(frames.shape[0]), "width": info.width, "height": info.height, "codec": info.codec}
    state["cuts"] = found
    state["clips"] = [
        {"start_frame": start, "end_frame": end, "start_time": start / info.fps, "end_time": end / info.fps, "codec_mv_mean_px": _nanmean(codec_motion[start:end])}
        for start, end in cuts.scenes_from_cuts(found, int(frames.shape[0]))
    ]


def _nanmean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _frames_per_clip(path: str, per_clip: list[list[int]], max_side: int | None) -> list[np.ndarray]:
    """One decoding pass over ``path`` for the frames of every clip; returns one (F, H, W, 3) array per clip.

    The cut stage counted the decodable frames, so every index here exists (decode_frames raises otherwise).
    """
    frames = decode_frames(path, [index for indices in per_clip for index in indices], max_side=max_side)
    bounds = np.cumsum([0, *map(len, per_clip)])
    return [frames[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def _flow_indices(start: int, end: int, fps: float, flow_fps: float) -> list[int]:
    stride = max(1, round(fps / flow_fps))
    indices = list(range(start, end, stride))
    if len(indices) < 2 and end - start >= 2:
        indices = [start, end - 1]  # a clip shorter than one flow step: use its two ends
    return indices


def _flow_body(item: dict, state: dict, config: CurationConfig) -> None:
    info = state["info"]
    per_clip = [_flow_indices(clip["start_frame"], clip["end_frame"], info["fps"], config.flow_fps) for clip in state["clips"]]
    per_clip_frames = _frames_per_clip(item["path"], per_clip, config.flow_max_side)
    use_dali = config.flow_backend == "dali" or (config.flow_backend == "auto" and flow.dali_available())
    if config.flow_backend == "dali" and not flow.dali_available():
        raise RuntimeError("flow_backend='dali' needs a CUDA device with the optical-flow engine and nvidia-dali")
    diagonal = math.hypot(info["width"], info["height"])
    for clip, indices, sequence in zip(state["clips"], per_clip, per_clip_frames):
        if config.codec_static_prefilter and clip.get("codec_mv_mean_px") == 0.0:
            clip.update(flow_mean_px=0.0, flow_mean_norm=0.0, motion_bucket_id=0, static=True, flow_backend="codec-motion-vectors")
            continue
        if len(indices) < 2:
            clip["skipped_flow"] = "fewer than 2 frames"
            continue
        analysis_width = sequence.shape[2]
        backend = f"torch-{config.torch_device().type}"
        if use_dali:
            try:
                magnitude, backend = flow.dali_mean_flow_magnitude(sequence), "dali"
            except Exception as error:  # "auto" must not lose the file to a driver/NVOF problem: fall back, say so
                if config.flow_backend == "dali":
                    raise
                magnitude = flow.mean_flow_magnitude(sequence, config.torch_device())
                backend += f" (dali failed: {type(error).__name__})"
        else:
            magnitude = flow.mean_flow_magnitude(sequence, config.torch_device())
        # Back to source pixels, and per 1/flow_fps seconds: the frame step is rounded (25 fps -> 13 frames),
        # and a clip shorter than one step uses its two ends, so the step is rescaled to the nominal interval.
        step_seconds = (indices[1] - indices[0]) / info["fps"]
        flow_px = magnitude * info["width"] / analysis_width / (step_seconds * config.flow_fps)
        clip["flow_mean_px"] = flow_px
        clip["flow_mean_norm"] = flow_px / diagonal
        clip["motion_bucket_id"] = flow.motion_bucket_id(flow_px / diagonal, config.flow_fps)
        clip["static"] = flow_px / diagonal < config.static_threshold
        clip["flow_backend"] = backend


def _key_frames(clip: dict) -> list[int]:
    start, end = clip["start_frame"], clip["end_frame"]
    return sorted({start, (start + end - 1) // 2, end - 1})


def _ocr_body(item: dict, state: dict, config: CurationConfig) -> None:
    reason = None if config.ocr else "disabled"
    reason = reason or ocr.tesseract_unavailable_reason()
    if reason:
        state["skipped"]["ocr"] = reason
        return
    per_clip_frames = _frames_per_clip(item["path"], [_key_frames(clip) for clip in state["clips"]], config.ocr_max_side)
    for clip, frames in zip(state["clips"], per_clip_frames):
        # The worst frame decides: text anywhere is text.
        clip["ocr_coverage"] = max(ocr.text_coverage(frame, config.ocr_min_confidence) for frame in frames)


stage_cuts = _guarded("cuts", _cuts_body)
stage_flow = _guarded("flow", _flow_body)
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
        per_clip_frames = _frames_per_clip(item["path"], [_key_frames(clip) for clip in state["clips"]], max_side=None)
        for clip, frames in zip(state["clips"], per_clip_frames):
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


def list_inputs(source: str | Path) -> list[tuple[Path, str | None]]:
    """A directory (every regular, non-hidden file below it) or a list file: one path per line, optionally
    followed by a tab and a caption; relative paths are relative to the list file."""
    source = Path(source)
    if source.is_dir():
        return [(path, None) for path in sorted(source.rglob("*")) if path.is_file() and not any(part.startswith(".") for part in path.relative_to(source).parts)]
    if source.is_file():
        entries = []
        for line in source.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            path_text, _, caption = line.partition("\t")
            path = Path(path_text.strip())
            entries.append((path if path.is_absolute() else source.parent / path, caption.strip() or None))
        return entries
    raise FileNotFoundError(f"curate: --input must be a directory or a list file, {source} is neither")


def _run_local(items: list[dict], config: CurationConfig, on_done: Callable[[dict], None]) -> None:
    clip_stage = ClipStage(config)
    for item in items:
        for stage in (stage_cuts, stage_flow, stage_ocr):
            item = stage(item, config)
        on_done(clip_stage(item))


def _run_ray(items: list[dict], config: CurationConfig, address: str, on_done: Callable[[dict], None]) -> None:
    """Ray Data stages (workers must see the input paths, e.g. a shared filesystem). GPU stages ask for a
    whole GPU per task/actor when the cluster has GPUs; the CLIP actor pool is one actor per GPU."""
    import ray  # noqa: PLC0415 - optional dependency, slow import

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=None if address == "local" else address, include_dashboard=False)
    try:
        cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
        gpus = 1 if cluster_gpus else 0
        dataset = ray.data.from_items(items)
        dataset = dataset.map(stage_cuts, fn_kwargs={"config": config})
        dataset = dataset.map(stage_flow, fn_kwargs={"config": config}, num_gpus=gpus)
        dataset = dataset.map(stage_ocr, fn_kwargs={"config": config})
        dataset = dataset.map(ClipStage, fn_constructor_kwargs={"config": config}, concurrency=max(1, cluster_gpus) if config.clip_model else 1, num_gpus=gpus if config.clip_model else 0)
        for item in dataset.iter_rows():  # streamed: each finished file is written as it arrives
            on_done(dict(item))
    finally:
        if started_here:
            ray.shutdown()


def curate(
    inputs: Iterable[tuple[str | Path, str | None]] | str | Path,
    manifest_path: str | Path,
    config: CurationConfig | None = None,
    filters: Iterable[str] = (),
    ray_address: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Curate ``inputs`` (a directory, a list file, or (path, caption) pairs) into ``manifest_path``.

    Files whose part already exists are skipped (resume). Returns a summary: files processed/skipped,
    clips, per-filter removals, seconds.
    """
    config = config or CurationConfig()
    parsed_filters = [parse_filter(spec) for spec in filters]  # bad filter text fails before any work
    if config.flow_backend == "dali" and not ray_address and not flow.dali_available():
        raise ValueError("curate: flow_backend='dali' needs a CUDA device with the optical-flow engine and nvidia-dali; use 'auto' or 'torch'")
    entries = list_inputs(inputs) if isinstance(inputs, (str, Path)) else [(Path(path), caption) for path, caption in inputs]
    # A file listed twice is one unit of work (and one part): keyed by path, size and mtime.
    items = list({item["file_key"]: item for item in (make_item(path, caption) for path, caption in entries)}.values())
    todo = [item for item in items if not manifest.part_path(manifest_path, item["file_key"]).is_file()]
    started = time.perf_counter()

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
    manifest.write_manifest(manifest_path, table)
    return {
        "files": len(items),
        "files_processed": len(todo),
        "files_skipped_finished": len(items) - len(todo),
        "clips": int((table["clip_index"] >= 0).sum()),
        "removed_by_filter": removed,
        "seconds": round(time.perf_counter() - started, 3),
        "config": asdict(config),
    }
