"""Long videos in windows (svd_fast.diffusers.long_video, svd_fast.sampling.long_video): window placement, the
blend of shared frames, holding shared frames to the video so far, the conditioning frame, the frame count and
determinism. The mechanics only, on the tiny pipeline (CPU); the seams on a trained model are measured by
bench/bench_long_video.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from svd_fast.diffusers.long_video import _decoded_frame, generate_long_video
from svd_fast.diffusers.tiny import TINY_HEIGHT, TINY_WIDTH, tiny_pipeline
from svd_fast.sampling.long_video import blend, blend_weights, check_long_video, window_starts


@pytest.mark.parametrize(
    ("frames", "window", "overlap", "starts"),
    [(24, 8, 2, [0, 6, 12, 16]), (24, 8, 0, [0, 8, 16]), (25, 8, 0, [0, 8, 16, 17]), (8, 8, 3, [0]), (5, 8, 2, [0]), (9, 8, 7, [0, 1])],
)
def test_window_starts_cover_the_video_with_windows_of_the_model_size(frames, window, overlap, starts) -> None:
    assert window_starts(frames, window, overlap) == starts
    covered = set().union(*(range(s, s + min(window, frames)) for s in starts))
    assert covered == set(range(frames))
    assert all(b - a <= window - overlap for a, b in zip(starts, starts[1:]))  # at least `overlap` shared frames


def test_blend_is_a_linear_crossfade() -> None:
    assert blend_weights(1).tolist() == [0.5]
    assert torch.allclose(blend_weights(3), torch.tensor([0.75, 0.5, 0.25], dtype=torch.float64))
    previous, current = torch.full((1, 3, 1, 1, 1), 4.0), torch.full((1, 3, 1, 1, 1), 8.0)
    assert blend(previous, current).flatten().tolist() == [5.0, 6.0, 7.0]
    with pytest.raises(ValueError, match="same shape"):
        blend(previous, current[:, :2])


@pytest.mark.parametrize(
    ("arguments", "match"),
    [((1, 8, 0), "num_frames must be an integer >= 2"), ((24, 1, 0), "window must be"), ((24, 8, -1), "overlap must be"),
     ((24, 8, 8), r"overlap must be smaller than window \(8\)"), ((24.0, 8, 2), "num_frames")],
)
def test_bad_long_video_arguments_name_the_argument(arguments, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_long_video(*arguments)


class _RecordingPipeline:
    """The tiny pipeline, recording each window's conditioning image and output latents."""

    def __init__(self, pipe) -> None:
        self.pipe, self.calls = pipe, []

    def __getattr__(self, name: str):
        return getattr(self.pipe, name)

    def __call__(self, image, **kwargs):
        output = self.pipe(image, **kwargs)
        self.calls.append((image, output.frames.clone()))
        return output


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((TINY_HEIGHT, TINY_WIDTH, 3)) * 255).astype(np.uint8))


ARGUMENTS = dict(window=3, num_inference_steps=2, height=TINY_HEIGHT, width=TINY_WIDTH, seed=3)  # windows at 0 and 2


def test_held_frames_are_kept_and_the_next_window_is_conditioned_on_the_first_shared_frame(pipe, image) -> None:
    recorder = _RecordingPipeline(pipe)
    video = generate_long_video(recorder, image, 5, overlap=1, hold=1.0, output_type="latent", **ARGUMENTS)
    (first_image, first), (second_image, second) = recorder.calls
    assert first_image is image and video.shape == (1, 5) + first.shape[2:]
    # Held to the end (sigma 0), the shared frame comes out of the second window exactly as the first left it.
    assert torch.equal(second[:, :1], first[:, 2:3])
    assert torch.equal(video[:, :3], first) and torch.equal(video[:, 3:], second[:, 1:])
    expected = np.asarray(_decoded_frame(pipe, first[:, 2:3]))
    assert np.array_equal(np.asarray(second_image), expected)
    again = generate_long_video(pipe, image, 5, overlap=1, hold=1.0, output_type="latent", **ARGUMENTS)
    assert torch.equal(again, video)  # deterministic


def test_unheld_shared_frames_are_blended_and_the_video_has_the_requested_frames(pipe, image) -> None:
    recorder = _RecordingPipeline(pipe)
    video = generate_long_video(recorder, image, 5, overlap=2, hold=0.0, output_type="latent", window=4,
                                **{k: v for k, v in ARGUMENTS.items() if k != "window"})  # fmt: skip  # windows at 0 and 1
    (_, first), (_, second) = recorder.calls
    shared = 3  # the last window moved back to end at frame 5 shares 3 frames
    assert not torch.equal(second[:, :shared], first[:, 1:])  # not held: the windows differ there
    weights = torch.tensor([0.75, 0.5, 0.25]).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(video[:, 1:4], weights * first[:, 1:] + (1 - weights) * second[:, :shared], rtol=0, atol=1e-6)
    assert torch.equal(video[:, :1], first[:, :1]) and torch.equal(video[:, 4:], second[:, shared:])
    frames = generate_long_video(pipe, image, 5, overlap=0, output_type="np", **ARGUMENTS)
    assert frames.shape == (5, TINY_HEIGHT, TINY_WIDTH, 3)


def test_long_video_refuses_arguments_it_sets_itself(pipe, image) -> None:
    with pytest.raises(ValueError, match=r"sets \['latents'\] itself"):
        generate_long_video(pipe, image, 5, latents=torch.zeros(1), **ARGUMENTS)
    with pytest.raises(ValueError, match="hold must be a number in"):
        generate_long_video(pipe, image, 5, hold=2.0, **ARGUMENTS)
    with pytest.raises(ValueError, match="overlap must be smaller than window"):
        generate_long_video(pipe, image, 5, overlap=3, **ARGUMENTS)
