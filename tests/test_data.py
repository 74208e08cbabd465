"""svd_fast.data: video probing, frame selection, DALI-vs-PyAV decoding (decode.py), clip indexing (clips.py) and the clip dataset (dataset.py), on generated videos."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from svd_fast.data import (
    VideoClipDataset,
    VideoDecodeError,
    WorkerClips,
    clip_frame_indices,
    dali_clip_loader,
    decode_all_frames,
    decode_all_frames_with_motion,
    decode_frames,
    decode_frames_at_times,
    frames_to_tensor,
    iter_windows,
    probe_video,
    synthetic,
)

NUM_FRAMES, HEIGHT, WIDTH, FPS = 24, 48, 64, 12


def _frame_ids(frames: np.ndarray) -> list[int]:
    """Recover each decoded frame's index from the brightness stripe written by `numbered_frames`."""
    return [int(round(frame[:8, :, :].mean() / 8)) for frame in frames]


def numbered_frames(count: int) -> np.ndarray:
    """Textured frames whose top 8 rows encode the frame index as a flat grey level (index * 8)."""
    frames = synthetic.translating_texture(count, HEIGHT, WIDTH, (0.0, 1.0))
    for index in range(count):
        frames[index, :8] = index * 8
    return frames


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    frames = numbered_frames(NUM_FRAMES)
    paths = {
        "vp9": synthetic.write_video(folder / "clip_vp9.webm", frames, FPS, codec="vp9"),
        "h264": synthetic.write_video(folder / "clip_h264.mp4", frames, FPS, codec="h264"),
        "short": synthetic.write_video(folder / "short.mp4", frames[:5], FPS, codec="h264"),
    }
    return paths


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, videos: dict[str, Path]) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    empty = folder / "empty.mp4"
    empty.write_bytes(b"")
    garbage = folder / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = folder / "notes.mov"
    text.write_text("this is not a video\n" * 50)
    truncated = folder / "truncated.mp4"
    data = videos["h264"].read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    return {"empty": empty, "garbage": garbage, "text": text, "truncated": truncated}


def test_probe_reports_frames_fps_size_codec(videos: dict[str, Path]) -> None:
    for codec in ("vp9", "h264"):
        info = probe_video(videos[codec])
        assert (info.num_frames, info.width, info.height, info.codec) == (NUM_FRAMES, WIDTH, HEIGHT, codec)
        assert info.fps == pytest.approx(FPS)
        assert info.duration == pytest.approx(NUM_FRAMES / FPS)


@pytest.mark.parametrize("kind", ["empty", "garbage", "text"])
def test_probe_rejects_bad_files_with_reason(bad_files: dict[str, Path], kind: str) -> None:
    with pytest.raises(VideoDecodeError) as error:
        probe_video(bad_files[kind])
    assert str(bad_files[kind]) in str(error.value) and error.value.reason


def test_probe_missing_file() -> None:
    with pytest.raises(VideoDecodeError, match="does not exist"):
        probe_video("/nonexistent/video.mp4")


def test_clip_indices_stride_and_fps() -> None:
    assert clip_frame_indices(10, 30, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert clip_frame_indices(20, 30, 3, stride=3) == [[0, 3, 6], [9, 12, 15]]
    # 30 fps -> 12 fps: step 2.5 frames, rounded per frame (Python rounds half to even).
    assert clip_frame_indices(30, 30, 4, target_fps=12) == [[0, 2, 5, 8], [10, 12, 15, 18], [20, 22, 25, 28]]
    assert clip_frame_indices(30, 30, 3, start=4, end=12) == [[4, 5, 6], [7, 8, 9]]
    assert clip_frame_indices(2, 30, 3) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_frames": 0}, "num_frames"),
        ({"stride": 0}, "stride"),
        ({"stride": 2, "target_fps": 5}, "either stride or target_fps"),
        ({"target_fps": -1}, "target_fps"),
        ({"start": -1}, "start"),
    ],
)
def test_clip_indices_bad_arguments(kwargs: dict, message: str) -> None:
    arguments = {"num_frames_in_video": 10, "video_fps": 30, "num_frames": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        clip_frame_indices(**arguments)


@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_pyav_decodes_requested_frames_in_order(videos: dict[str, Path], codec: str) -> None:
    indices = [7, 0, 3, 3, 20]
    frames = decode_frames(videos[codec], indices, backend="pyav")
    assert frames.shape == (len(indices), HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
    assert _frame_ids(frames) == indices


def test_dali_cpu_matches_pyav_on_vp9(videos: dict[str, Path]) -> None:
    indices = [0, 5, 11, 23, 5]
    dali = decode_frames(videos["vp9"], indices, backend="dali").astype(np.float64)
    pyav = decode_frames(videos["vp9"], indices, backend="pyav").astype(np.float64)
    assert dali.shape == pyav.shape
    assert _frame_ids(dali.astype(np.uint8)) == indices
    # Luma agrees to rounding; RGB differs only where DALI interpolates 4:2:0 chroma and swscale replicates it.
    luma_weights = np.array([0.299, 0.587, 0.114])
    luma_difference = np.abs(dali @ luma_weights - pyav @ luma_weights)
    assert luma_difference.mean() < 1.5, luma_difference.mean()
    assert np.abs(dali - pyav).mean() < 6.0


def test_dali_backend_refuses_h264(videos: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="DALI's CPU decoder handles"):
        decode_frames(videos["h264"], [0], backend="dali")


def test_decode_past_end_of_truncated_file(bad_files: dict[str, Path]) -> None:
    with pytest.raises(VideoDecodeError):
        decode_frames(bad_files["truncated"], list(range(NUM_FRAMES)), backend="pyav")


@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_max_side_scales_while_decoding(videos: dict[str, Path], codec: str) -> None:
    indices = [7, 0, 20]
    full = decode_frames(videos[codec], indices, backend="pyav")
    small = decode_frames(videos[codec], indices, max_side=32)  # "auto" scales with PyAV, VP9 included
    assert small.shape == (3, HEIGHT // 2, WIDTH // 2, 3) and small.dtype == np.uint8
    assert [int(round(frame[:3].mean() / 8)) for frame in small] == indices  # the 8-row stripe is 4 rows now
    assert abs(small.astype(np.float64).mean() - full.astype(np.float64).mean()) < 1.0  # resampling keeps the mean
    np.testing.assert_array_equal(decode_frames(videos[codec], indices, backend="pyav", max_side=WIDTH), full)  # fits: unscaled


def test_max_side_bad_arguments(videos: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="max_side"):
        decode_frames(videos["vp9"], [0], backend="dali", max_side=32)
    with pytest.raises(ValueError, match="max_side"):
        decode_frames(videos["h264"], [0], max_side=1)
    with pytest.raises(ValueError, match="max_side"):
        decode_all_frames(videos["h264"], max_side=0)


@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_decode_all_frames_small(videos: dict[str, Path], codec: str) -> None:
    frames = decode_all_frames(videos[codec], max_side=32)
    assert frames.shape == (NUM_FRAMES, HEIGHT // 2, WIDTH // 2, 3)
    np.testing.assert_array_equal(frames, decode_frames(videos[codec], list(range(NUM_FRAMES)), max_side=32))
    with_motion, motion = decode_all_frames_with_motion(videos[codec], max_side=32)
    np.testing.assert_array_equal(with_motion, frames)
    assert motion.shape == (NUM_FRAMES,) and np.isnan(motion[0])  # the first frame is intra-coded
    if codec == "h264":  # the texture moves 1 px per frame; FFmpeg's VP9 decoder exports no vectors (all NaN)
        assert np.isfinite(motion[1:]).all() and np.nanmean(motion) > 0.5


def test_decode_all_frames_bad_and_damaged_files(videos: dict[str, Path], bad_files: dict[str, Path], tmp_path: Path) -> None:
    for kind in ("empty", "garbage", "text", "truncated"):  # "truncated" lost its index (moov): unreadable
        with pytest.raises(VideoDecodeError) as error:
            decode_all_frames(bad_files[kind])
        assert str(bad_files[kind]) in str(error.value) and error.value.reason
    data = videos["vp9"].read_bytes()
    damaged = tmp_path / "cut_short.webm"
    damaged.write_bytes(data[: len(data) // 2])  # WebM needs no index: the frames before the cut still decode
    frames = decode_all_frames(damaged)
    assert 0 < len(frames) < NUM_FRAMES and _frame_ids(frames) == list(range(len(frames)))


def test_dataset_yields_normalised_clips(videos: dict[str, Path]) -> None:
    dataset = VideoClipDataset([videos["h264"]], num_frames=4, size=(32, 40), stride=2)
    samples = list(dataset)
    assert [sample["start_frame"] for sample in samples] == [0, 8, 16]
    pixels = samples[0]["pixel_values"]
    assert pixels.shape == (4, 3, 32, 40) and pixels.dtype == torch.float32
    assert -1.0 <= pixels.min() < -0.5 and 0.5 < pixels.max() <= 1.0
    # stride 2 feeds every other frame: the fps conditioning must see 6 fps, not the file's 12 (issue #19).
    assert samples[0]["fps"] == pytest.approx(FPS / 2) and dataset.errors == []
    assert list(VideoClipDataset([videos["h264"]], num_frames=4, size=(32, 40)))[0]["fps"] == pytest.approx(FPS)


def test_dataset_decodes_each_file_once(videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    av = pytest.importorskip("av")

    opened: list[str] = []
    real_open = av.open

    def counting_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(av, "open", counting_open)
    samples = list(VideoClipDataset([videos["h264"]], num_frames=4, size=(32, 40), backend="pyav"))
    assert len(samples) == NUM_FRAMES // 4
    assert len(opened) == 2  # one probe, one decoding pass for all six windows
    # Frames are resized while decoding (swscale, area averaging): close to resizing the tensors afterwards.
    expected = frames_to_tensor(decode_frames(videos["h264"], list(range(4, 8))), (32, 40))
    assert float((samples[1]["pixel_values"] - expected).abs().mean()) < 0.03


def test_iter_windows_overlapping_and_past_end(videos: dict[str, Path]) -> None:
    windows = [[0, 2, 4], [2, 3], [10, 11]]
    got = dict(iter_windows(videos["h264"], windows, "pyav"))
    assert sorted(got) == [0, 1, 2]
    for number, window in enumerate(windows):
        assert _frame_ids(got[number]) == window
    with pytest.raises(VideoDecodeError, match="past the decodable end"):
        list(iter_windows(videos["h264"], [[NUM_FRAMES + 5]], "pyav"))


def test_decode_frames_at_times_seeks(videos: dict[str, Path]) -> None:
    times = [20 / FPS, 1 / FPS, 5 / FPS, 5 / FPS]
    frames = decode_frames_at_times(videos["h264"], times, seek_gap=0.1)
    assert _frame_ids(frames) == [20, 1, 5, 5]


def test_still_image_is_not_a_one_frame_video(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "cover.png")
    with pytest.raises(VideoDecodeError, match="still image"):
        probe_video(tmp_path / "cover.png")
    with pytest.raises(VideoDecodeError, match="still image"):
        decode_all_frames(tmp_path / "cover.png")


def test_dataset_target_fps_and_manifest_columns(videos: dict[str, Path], tmp_path: Path) -> None:
    import pandas as pd

    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame([{"file": str(videos["vp9"]), "start_frame": 4, "end_frame": 16, "motion_bucket_id": 99}]).to_parquet(manifest)
    samples = list(VideoClipDataset(manifest, num_frames=3, size=(48, 64), target_fps=6))
    # 12 fps -> 6 fps is every other frame; frames 4..15 hold two 3-frame clips.
    assert [sample["start_frame"] for sample in samples] == [4, 10]
    assert all(sample["motion_bucket_id"] == 99 and sample["fps"] == 6 for sample in samples)


def test_curation_manifest_rows_rejected_or_failed_are_left_out(videos: dict[str, Path]) -> None:
    rows = [
        {"source": str(videos["vp9"]), "start_frame": 0, "end_frame": 8, "keep": True, "error": None},
        {"source": str(videos["vp9"]), "start_frame": 8, "end_frame": 16, "keep": False, "error": None},
        {"source": str(videos["h264"]), "start_frame": 0, "end_frame": 8, "keep": False, "error": "decode failed"},
    ]
    samples = list(VideoClipDataset(rows, num_frames=8, size=(16, 16)))
    assert [(sample["path"], sample["start_frame"]) for sample in samples] == [(str(videos["vp9"]), 0)]


def test_short_clips_skip_or_pad(videos: dict[str, Path]) -> None:
    skipping = VideoClipDataset([videos["short"]], num_frames=8, size=(48, 64))
    assert list(skipping) == [] and "shorter than one clip" in skipping.errors[0][1]
    padded = list(VideoClipDataset([videos["short"]], num_frames=8, size=(48, 64), on_short="pad"))
    assert len(padded) == 1
    frames = padded[0]["pixel_values"]
    torch.testing.assert_close(frames[5], frames[4])  # frames 5..7 repeat the last real frame (4)
    torch.testing.assert_close(frames[7], frames[4])


def test_sharding_covers_every_clip_once(videos: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(5):
        synthetic.write_video(folder / f"v{index}.mp4", numbered_frames(8), FPS, codec="h264")
    seen = []
    for rank in range(3):
        dataset = VideoClipDataset(folder, num_frames=4, size=(16, 16), shuffle=True, seed=3, rank=rank, world_size=3)
        seen += [(Path(sample["path"]).name, sample["start_frame"]) for sample in dataset]
    expected = [(f"v{index}.mp4", start) for index in range(5) for start in (0, 4)]
    assert sorted(seen) == sorted(expected)


def test_dataloader_workers_shard_files(videos: dict[str, Path]) -> None:
    dataset = VideoClipDataset([videos["vp9"], videos["h264"]], num_frames=12, size=(16, 16))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    starts = sorted((Path(sample["path"]).suffix, sample["start_frame"]) for sample in loader)
    assert starts == [(".mp4", 0), (".mp4", 12), (".webm", 0), (".webm", 12)]


def _clips(samples) -> list[tuple[str, int, torch.Tensor]]:
    return [(Path(sample["path"]).name, sample["start_frame"], sample["pixel_values"]) for sample in samples]


def _assert_same_clips(got: list, expected: list) -> None:
    assert [clip[:2] for clip in got] == [clip[:2] for clip in expected]
    for (_, _, pixels), (_, _, wanted) in zip(got, expected):
        assert torch.equal(pixels, wanted)


def test_worker_clips_equal_in_loop_clips_and_resume_exactly(videos: dict[str, Path], bad_files: dict[str, Path]) -> None:
    from svd_fast.training.step import ClipStream

    sources = [videos["vp9"], bad_files["garbage"], videos["h264"], videos["short"], videos["vp9"]]
    settings = dict(num_frames=8, size=(24, 24), random_crop=True, shuffle=True, seed=5, on_short="pad")
    in_loop = VideoClipDataset(sources, **settings)
    workers = WorkerClips(VideoClipDataset(sources, **settings), num_workers=2, seed=5)
    for epoch in (0, 1):  # a new shuffle and new crops each epoch; persistent workers follow set_epoch
        in_loop.set_epoch(epoch)
        workers.set_epoch(epoch)
        expected = _clips(in_loop)
        _assert_same_clips(_clips(workers), expected)
    assert len(expected) == 3 + 3 + 1 + 3 and workers.errors == in_loop.errors != []
    # The trainer's stream over workers: the same batches, and a stream resumed at a saved position continues them.
    stream = ClipStream(WorkerClips(VideoClipDataset(sources, **settings), num_workers=2, seed=1), batch_size=3)
    reference = ClipStream(VideoClipDataset(sources, **settings), batch_size=3)
    batches = [_clips(stream.next_batch()) for _ in range(3)]
    for batch in batches:
        _assert_same_clips(batch, _clips(reference.next_batch()))
    resumed = ClipStream(WorkerClips(VideoClipDataset(sources, **settings), num_workers=2, seed=1), 3, epoch=0, position=6)
    _assert_same_clips(_clips(resumed.next_batch()), batches[2])
    assert (resumed.epoch, resumed.position) == (stream.epoch, stream.position) == (0, 9)


def test_bad_files_are_reported_not_fatal(videos: dict[str, Path], bad_files: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    sources = [bad_files["empty"], videos["vp9"], bad_files["garbage"], bad_files["text"], bad_files["truncated"], videos["h264"]]
    dataset = VideoClipDataset(sources, num_frames=8, size=(16, 16))
    with caplog.at_level(logging.WARNING):
        samples = list(dataset)
    good = {str(videos["vp9"]), str(videos["h264"])}
    assert {sample["path"] for sample in samples} == good
    assert len([s for s in samples if s["path"] in good]) == 6  # 3 clips of 8 from each good file
    reported = {path for path, _reason in dataset.errors}
    assert reported == {str(bad_files[kind]) for kind in ("empty", "garbage", "text", "truncated")}
    assert "empty" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_frames": 0}, "num_frames"),
        ({"size": (0, 4)}, "size"),
        ({"on_short": "drop"}, "on_short"),
        ({"backend": "nvdec"}, "backend"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"stride": 2, "target_fps": 3}, "either stride or target_fps"),
    ],
)
def test_dataset_bad_arguments(videos: dict[str, Path], kwargs: dict, message: str) -> None:
    arguments = {"sources": [videos["vp9"]], "num_frames": 2, "size": (8, 8), **kwargs}
    with pytest.raises(ValueError, match=message):
        VideoClipDataset(**arguments)


def test_dataset_without_videos_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no videos here")
    with pytest.raises(ValueError, match="no video files"):
        VideoClipDataset(tmp_path, num_frames=2, size=(8, 8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on machines without a GPU")
def test_gpu_loader_without_gpu_points_to_cpu_dataset(videos: dict[str, Path]) -> None:
    with pytest.raises(RuntimeError, match="VideoClipDataset"):
        next(dali_clip_loader([videos["h264"]], batch_size=1, num_frames=4, size=(16, 16)))


@pytest.mark.gpu
@pytest.mark.gpu_optional
def test_gpu_loader_matches_cpu_dataset(videos: dict[str, Path]) -> None:
    pytest.importorskip("nvidia.dali", reason="the GPU loader needs nvidia-dali (not in the GPU image)")
    batches = list(dali_clip_loader([videos["h264"]], batch_size=1, num_frames=4, size=(48, 64), shuffle=False))
    cpu = list(VideoClipDataset([videos["h264"]], num_frames=4, size=(48, 64)))
    assert len(batches) == len(cpu)
    first = batches[0]["pixel_values"][0].cpu()
    assert first.shape == (4, 3, 48, 64)
    assert (first - cpu[0]["pixel_values"]).abs().mean() < 0.05


@pytest.mark.gpu
@pytest.mark.gpu_optional
@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_nvdec_dataset_matches_pyav(videos: dict[str, Path], codec: str) -> None:
    """Training's `video_decoder: dali` on CUDA: DALI's mixed (NVDEC) decoder gives the clips PyAV gives."""
    pytest.importorskip("nvidia.dali", reason="NVDEC decoding needs nvidia-dali (the dali-cu12/dali-cu13 extra)")
    gpu = list(VideoClipDataset([videos[codec]], num_frames=4, size=(HEIGHT, WIDTH), decode_device="cuda"))
    cpu = list(VideoClipDataset([videos[codec]], num_frames=4, size=(HEIGHT, WIDTH), backend="pyav"))
    assert [sample["start_frame"] for sample in gpu] == [sample["start_frame"] for sample in cpu]
    for on_gpu, on_cpu in zip(gpu, cpu):
        assert on_gpu["pixel_values"].is_cuda and on_gpu["pixel_values"].shape == (4, 3, HEIGHT, WIDTH)
        frames = ((on_gpu["pixel_values"].cpu() + 1) * 127.5).permute(0, 2, 3, 1).round().to(torch.uint8).numpy()
        assert _frame_ids(frames) == list(range(on_cpu["start_frame"], on_cpu["start_frame"] + 4))
        assert (on_gpu["pixel_values"].cpu() - on_cpu["pixel_values"]).abs().mean() < 0.05


def test_nvdec_needs_cuda(videos: dict[str, Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: test_nvdec_dataset_matches_pyav covers decode_device='cuda'")
    with pytest.raises(ValueError, match="decode_device='cpu'"):
        VideoClipDataset([videos["h264"]], num_frames=4, size=(16, 16), decode_device="cuda")
