"""Validation samples during training: every validate_every steps a clip per held-out first frame, sampled with the
EMA weights, written whole into OUTPUT_DIR/validation/step_N and named in that step's log record; the same clip as
sampling the exported EMA pipeline; the training itself unchanged by validation (losses, resume); bad validation
settings rejected before any model loads. CPU, tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from training_fixtures import tiny_config, workdir_fixture

from svd_fast import media
from svd_fast.data.synthetic import translating_texture
from svd_fast.diffusers.tiny import TINY_HEIGHT, TINY_NUM_FRAMES, TINY_WIDTH
from svd_fast.training import train
from svd_fast.training.config import default_vae_chunk

workdir = workdir_fixture("training_validation")

VALIDATION = {"validation.every": 1, "validation.inference_steps": 2, "ema_decay": 0.5, "use_svd_fast_kernels": False}


def _first_frame(workdir: Path) -> Path:
    path = workdir / "held_out.png"
    if not path.exists():  # a first frame the training clip does not contain
        Image.fromarray(translating_texture(1, TINY_HEIGHT, TINY_WIDTH, seed=11)[0]).save(path)
    return path


def _decoded(path: Path) -> np.ndarray:
    av = pytest.importorskip("av", reason="decoding the validation clips needs PyAV")
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_validation_clips_are_the_ema_pipelines_samples(workdir: Path) -> None:
    image = _first_frame(workdir)
    values = tiny_config(workdir, "validated", max_steps=2, **{"logging.export": True, "validation.images": [str(image)], **VALIDATION})
    result = train(values)
    plain = train(tiny_config(workdir, "not_validated", max_steps=2, ema_decay=0.5, use_svd_fast_kernels=False))
    assert result.losses == plain.losses  # sampling leaves the training's RNG stream and VAE as they were

    records = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    clips = {record["step"]: record["validation"] for record in records}
    assert sorted(clips) == [1, 2] and all(np.isfinite(record["loss"]) for record in records)
    for step, paths in clips.items():
        assert paths == [str(workdir / "validated" / "validation" / f"step_{step:06d}" / "image_0.mp4")]
        assert _decoded(Path(paths[0])).shape == (TINY_NUM_FRAMES, TINY_HEIGHT, TINY_WIDTH, 3)
    assert not list((workdir / "validated" / "validation").glob(".*"))  # no staging folder left behind

    # The last validation used the EMA after step 2, which is what the pipeline export holds (export_ema).
    from diffusers import StableVideoDiffusionPipeline

    pipe = StableVideoDiffusionPipeline.from_pretrained(result.export_path)
    frames = pipe(media.load_image(image), height=TINY_HEIGHT, width=TINY_WIDTH, num_frames=TINY_NUM_FRAMES,
                  num_inference_steps=2, fps=7, motion_bucket_id=127, decode_chunk_size=default_vae_chunk(TINY_NUM_FRAMES),
                  generator=torch.Generator().manual_seed(0)).frames[0]
    reference = media.write_frames(frames, workdir / "reference.mp4", fps=7)
    assert np.array_equal(_decoded(reference), _decoded(Path(clips[2][0])))
    # ... and not the step-1 EMA: the validations follow training.
    assert not np.array_equal(_decoded(Path(clips[1][0])), _decoded(Path(clips[2][0])))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"validation.every": 2}, "validation.images: validation.every"),
     ({"validation.every": 2, "validation.images": ["missing.png"]}, "validation.images: missing.png does not exist"),
     ({"validation.every": -1}, "validation.every"), ({"validation.inference_steps": 0}, "validation.inference_steps"),
     ({"validate_every": 2, "validation_images": ["missing.png"]}, "validation_images (now validation.images): missing.png does not exist")],
)
def test_bad_validation_settings_are_one_line_before_any_model(workdir: Path, overrides: dict, message: str, monkeypatch, capsys) -> None:
    from svd_fast import cli
    from svd_fast.training import trainer

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded for a bad input")

    monkeypatch.setattr(trainer, "build_models", no_models)  # train() checks its inputs before it builds any
    monkeypatch.chdir(workdir)
    config = workdir / "validation_bad.json"
    config.write_text(json.dumps(tiny_config(workdir, "bad")))
    arguments = [item for name, value in overrides.items() for item in ("--set", f"{name}={json.dumps(value)}")]
    assert cli.main(["train", "--config", str(config), *arguments]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("svd-fast train: error: ") and message in lines[0], lines
