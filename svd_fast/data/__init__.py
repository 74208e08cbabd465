"""Video data: probing and decoding (decode.py), clip indexing and sources (clips.py), the training dataset
(dataset.py), its clips decoded by DataLoader workers (loader.py), and small synthetic videos with known content
(synthetic.py)."""

from svd_fast.data.clips import ClipSource, clip_frame_indices, sources_from
from svd_fast.data.dataset import VideoClipDataset, dali_clip_loader, frames_to_tensor
from svd_fast.data.decode import (
    VideoDecodeError,
    VideoInfo,
    decode_all_frames,
    decode_all_frames_with_motion,
    decode_frames,
    decode_frames_at_times,
    iter_windows,
    probe_video,
)
from svd_fast.data.loader import WorkerClips

__all__ = [
    "ClipSource", "VideoClipDataset", "VideoDecodeError", "VideoInfo", "clip_frame_indices", "dali_clip_loader",
    "decode_all_frames", "decode_all_frames_with_motion", "decode_frames", "decode_frames_at_times", "frames_to_tensor",
    "iter_windows", "probe_video", "sources_from", "WorkerClips",
]
